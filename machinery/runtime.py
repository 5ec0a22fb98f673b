"""
The machinery train.py and evaluate.py share, none of it the method, kept out of the reader's way:

    save_checkpoint / read_checkpoint / load_checkpoint    plain dicts of tensors and values (weights_only loading)
    Parser, run_cli, add_shared_flags                         a bad flag or a failed run is one line, never a traceback
    pick_device                                            the device a command runs on
    writable, free_space, Lock, NotReady, progress_line    folders, disks, a second process, long work

Everything in machinery/ may import it; it imports vit.py, to rebuild a model from its checkpoint, and nothing
else of ours.
"""

import argparse
import fcntl
import os
import re
import shutil
import signal
import sys
import time
import uuid
from dataclasses import asdict

import torch

from vit import VisionTransformer, ViTConfig


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this model, or one that cannot be written; one line naming the file."""


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss, a teacher that does not fit); the message is one line."""


# -------------------------------------------------------------------------------------------------- checkpoints

def temporary_name(path):
    """A name beside path that no other process uses: two runs writing at once never share a half-written file."""
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def save_checkpoint(path, model, **values):
    """
    Writes the model's weights and config with plain values (numbers, strings, lists, dicts, tensors; never a
    pickled object), so torch.load(path, weights_only=True) reads it. Written to a temporary file, then renamed:
    a crash or a full disk never leaves half a checkpoint, and the one written before stays. Non-finite weights
    are never written.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: not written: {len(bad)} tensors hold NaN or infinity, e.g. {bad[0]}")
    tmp = temporary_name(path)
    try:
        torch.save(dict(values, model=state, vit_config=asdict(model.cfg)), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its zip writer
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"{path}: not written ({first_line(err)}); {free_space(path)} free on that disk; the "
                              "checkpoints written before it are kept") from None


def first_line(err):
    """An exception as one line: its type and the first line of its message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def load_weights(path):
    """torch.load(path, weights_only=True), with a one-line CheckpointError for a file that is not such a pickle."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, or a pickle of Python objects that weights_only refuses
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch names the object it refused to build
        if found:
            raise CheckpointError(f"{path}: not a plain-tensor checkpoint: it holds a pickled {found.group(1)}, "
                                  "which was refused (weights_only loading never runs such code)") from None
        raise CheckpointError(f"{path}: not a plain-tensor checkpoint ({first_line(err)})") from None


def read_checkpoint(path):
    """The dict save_checkpoint wrote, loaded with weights_only=True; CheckpointError (one line) for anything else."""
    ckpt = load_weights(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "vit_config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' and 'vit_config' entries)")
    return ckpt


def label_mismatch(trained, here, where):
    """Where a checkpoint's labels differ from those of `where` (this data, the test set), as "label 2 is 'TB', the
    test set's 'PNEUMONIA'", or None where they are the same."""
    if list(trained) == list(here):
        return None
    k = next((k for k, (a, b) in enumerate(zip(trained, here)) if a != b), None)
    if k is None:
        return f"it has {len(trained)} labels, {where} {len(here)}"
    return f"label {k + 1} is '{trained[k]}', {where}'s '{here[k]}'"


def run_name(ckpt):
    """teacher@224, baseline@28, mlcak@28: the role and the resolution the model sees."""
    return f"{ckpt['role']}@{ckpt['res']}"


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by save_checkpoint -> (VisionTransformer in eval mode, the checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:
        model = VisionTransformer(ViTConfig(**ckpt["vit_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as err:
        raise CheckpointError(f"{path}: weights do not fit the config they were saved with ({type(err).__name__})") from None
    return model.to(device).eval(), ckpt


# -------------------------------------------------------------------------------------------------- command line

def add_shared_flags(p):
    """The flags of train.py that bench.py takes too: the data, the batch, the device."""
    p.add_argument("--data", help="dataset folder or CSV file in a layout of README's 'Data' (default: synthetic "
                   "VinDr-style data in data/synthetic)")
    p.add_argument("--cache-dir", help="where decoded images are cached (default: data/cache in this project)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for forward and loss")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit code 2), not a usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _terminate(signum, frame):
    raise KeyboardInterrupt(signum)


def _block_sigterm():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _default_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _unblock_sigterm()


# A forked worker (a decoding pool, a data loader) must end at once on SIGTERM, as its pool expects, not raise in our
# handler. It is born with SIGTERM blocked and sets the default before unblocking it: a SIGTERM sent the moment it
# starts then kills it, where a Python handler would lose it (and the pool would wait for that worker for ever).
os.register_at_fork(before=_block_sigterm, after_in_parent=_unblock_sigterm, after_in_child=_default_sigterm)


def run_cli(main, argv, errors, resume=True):
    """
    main(argv) with the command line's exit codes: an error of the classes in errors is one line on stderr (exit 1);
    Ctrl-C, and SIGTERM as schedulers and `timeout` send it, end with one line (exit 130 and 143), which says how to
    go on where the command can resume.
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        main(argv)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        terminated = err.args == (signal.SIGTERM,)
        how = ": run the same command with --resume to continue from the last finished epoch" if resume else ""
        print(f"\n{'terminated' if terminated else 'interrupted'}{how}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def pick_device(name):
    """--device: auto picks cuda, then mps, then cpu; a device that is not there is a ValueError."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU (or this torch is a CPU build)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps:
        raise ValueError(f"--device {name}: MPS is not available here")
    return device


# -------------------------------------------------------------------------------------------------- folders

def writable(folder):
    """None if files can be written in folder (made if missing), else the reason."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{uuid.uuid4().hex}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror}"
    return None


def free_space(path):
    """The free space of the disk that holds path, as text ('1.2 GB')."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "an unknown amount"
    return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"


class Lock:
    """
    An exclusive lock on a folder's work (a hidden file in it, held by flock), so that two processes started at once
    never write one cache or one run folder together: the second waits for the first, then finds its work done.
    The operating system releases it when the holder ends, however it ends.
    """

    def __init__(self, path, what, enabled=True):
        self.path, self.what, self.enabled, self.file = path, what, enabled, None

    def __enter__(self):
        if not self.enabled:  # (under torchrun, rank 0 alone writes a run folder, so it alone takes its lock)
            return self
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            print(f"waiting for {holder}, which holds {self.what} ({self.path})", flush=True)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
        return False


class NotReady(Exception):
    """Another process is still making the data or the cache that this one would read."""


def progress_line(what, done, total, start):
    rate = done / max(time.time() - start, 1e-9)
    return f"{what}: {done}/{total} ({rate:.0f}/s, ETA {(total - done) / max(rate, 1e-9):.0f}s)"
