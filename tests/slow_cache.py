"""
train.py with rank 0's cache build delayed past a short process-group timeout. A run that waited for the cache
inside a collective (a barrier) would time out here; test_train.py runs this file under torchrun.
"""

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402

TIMEOUT, DELAY = 5, 8  # seconds
init_process_group, build_cache = dist.init_process_group, data.build_cache


def short_timeout(*args, **kwargs):
    return init_process_group(*args, **dict(kwargs, timeout=datetime.timedelta(seconds=TIMEOUT)))


def slow_build(*args, **kwargs):
    if kwargs.get("create", True) and os.environ["RANK"] == "0":
        time.sleep(DELAY)
    return build_cache(*args, **kwargs)


dist.init_process_group, data.build_cache = short_timeout, slow_build
sys.exit(train.cli(sys.argv[1:]))
