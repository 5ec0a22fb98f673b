"""
What a training run keeps track of, beyond the method: its folder's name and reuse, its log.csv, its processes under
torchrun and its clock. train.py's machinery, kept out of the reader's way (runtime.py holds what it shares with
evaluate.py).

    RunFolders(args, info, device)    teacher-224-<hash>, baseline-28-<hash>, mlcak-28-<hash>: named by every flag
                                      that changes a run's numbers, so a finished run is reused and a changed flag
                                      trains anew; interrupted runs of the same data found for --resume
    finished(run_dir, epochs)         a run that reached its last epoch with finite weights
    EpochLog(run_dir)                 log.csv, one row per epoch
    Ddp(device)                       torchrun's environment: ranks, the process group, gathering
    Clock                             each stage's seconds, for the line a run ends with
"""

import csv
import hashlib
import json
import os
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from layouts import DataError
from runtime import CheckpointError, NotReady, first_line, free_space, read_checkpoint, temporary_name
from vit import VARIANTS


# the flags that change a run's numbers: each is in its run folder's name (RunFolders), directly or through the caches
# (--data, --uncertain, --views, --boxes); the others cannot change a number (--device only beyond rounding among fp32
# devices); and three choose which runs are made, each run's resolution and role naming its folder
FLAGS_THAT_MATTER = ("data", "model", "img_size", "epochs", "batch_size", "lr", "weight_decay", "warmup", "alpha", "beta",
                     "gamma", "teacher", "readers", "uncertain", "views", "boxes", "val_fraction", "init", "init_norm",
                     "amp", "tf32", "compile", "seed")
FLAGS_THAT_DO_NOT = ("bootstrap", "out", "cache_dir", "rebuild_cache", "device", "workers", "resume", "log_every")
FLAGS_THAT_CHOOSE_RUNS = ("res", "no_kd", "compare")


class RunFolders:
    """
    Run folders named by a hash of every setting that changes their numbers, so a finished run is found and reused
    and a changed flag trains anew: the recipe below (the data by their caches, whose names hold the files, labels
    and boxes), bf16 (--amp), TF32 where CUDA uses it, --compile, and for mlcak its teacher and alpha, beta, gamma.
    """

    def __init__(self, args, info, device):
        self.args = args
        self.recipe = dict(model=dict(VARIANTS[args.model], name=args.model), img_size=args.img_size, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                           seed=args.seed, readers=args.readers, val_fraction=args.val_fraction,
                           data=[os.path.basename(info["train_cache"]), os.path.basename(info["test_cache"])],
                           init=[os.path.abspath(args.init), os.path.getmtime(args.init), args.init_norm] if args.init else None)
        # precision, named only where it is not the default, so that a default run keeps its folder names
        numerics = dict(amp=args.amp, tf32=device.type == "cuda" and args.tf32, compile=args.compile)
        self.recipe.update({k: v for k, v in numerics.items() if v})
        self.train_cache = info["train_cache"]
        self.teacher = os.path.join(args.out, f"teacher-{args.img_size}-{short_hash(self.recipe)}")
        self.teacher_checkpoint = args.teacher or os.path.join(self.teacher, "best.pt")
        # an mlcak student is tied to its teacher: a given --teacher file, or the one this recipe trains
        self.teacher_key = short_hash(args.teacher + str(os.path.getmtime(args.teacher))) if args.teacher else short_hash(self.recipe)

    def student(self, method, res):
        settings = dict(self.recipe, res=res)
        if method == "mlcak":
            settings.update(teacher=self.teacher_key, alpha=self.args.alpha, beta=self.args.beta, gamma=self.args.gamma)
        return os.path.join(self.args.out, f"{method}-{res}-{short_hash(settings)}")

    def interrupted(self, role, res, run_dir):
        """The unfinished runs of this role, resolution and data in --out, each with the flags that differ from now."""
        found = []
        for name in sorted(os.listdir(self.args.out)):
            path = os.path.join(self.args.out, name, "last.pt")
            if not name.startswith(f"{role}-{res}-") or os.path.join(self.args.out, name) == run_dir or not os.path.isfile(path):
                continue
            last = read_checkpoint(path)
            then = last.get("args", {})
            if last["epoch"] == then.get("epochs") or last.get("data", {}).get("train_cache") != self.train_cache:
                continue
            differ = [f"--{k.replace('_', '-')} {then[k]}" for k in sorted(then)
                      if k in FLAGS_THAT_MATTER and then[k] != getattr(self.args, k)]
            found.append(f"{os.path.join(self.args.out, name)} (epoch {last['epoch']}/{then.get('epochs')}; "
                         f"it had {', '.join(differ) or 'the same flags'})")
        return found


def short_hash(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def finished(run_dir, epochs):
    """A run that reached its last epoch with finite weights; anything else is trained (or resumed) again."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.isfile(path):
        return False
    last = read_checkpoint(path)
    return last["epoch"] == epochs and all(torch.isfinite(v).all() for v in last["model"].values())


class EpochLog:
    """
    log.csv in a run folder, one row per epoch: its step, learning rate, each loss term averaged over the epoch, the
    validation scores, seconds and images per second. A resumed run keeps the rows up to the epoch it resumes after,
    so an epoch trained again (the run killed between its row and its checkpoint) is never written twice.
    """

    def __init__(self, run_dir, after_epoch=0):
        self.path, self.rows = os.path.join(run_dir, "log.csv"), []
        if after_epoch and os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= after_epoch]

    def add(self, **row):
        self.rows.append(row)
        tmp = temporary_name(self.path)
        try:  # the whole file, renamed into place: a crash leaves the old one, never half a row
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)
            os.replace(tmp, self.path)
        except OSError as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise CheckpointError(f"{self.path}: not written ({first_line(err)}); {free_space(self.path)} free") from None


class Ddp:
    """
    torchrun's environment, nanoGPT-style: one process per device; global rank 0 logs, saves and evaluates. The
    process group starts only once the data are ready (start), so no collective waits, and times out, while a
    machine decodes a large dataset into its cache; the first process of each machine builds that machine's cache
    (prepare).
    """

    def __init__(self, device, tf32=True):
        self.on = "RANK" in os.environ
        self.rank, self.world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if self.on else (0, 1)
        self.master, self.builder = self.rank == 0, int(os.environ.get("LOCAL_RANK", 0)) == 0
        if self.on and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        self.device, self.started = device, False

    def prepare(self, build):
        """build(create=True) on the first process of each machine; the others call build(create=False) until it
        stops raising NotReady, that is until the data and caches it reads are complete."""
        announced = False
        while True:
            try:
                return build(create=self.builder)
            except NotReady as err:
                if not announced:
                    print(f"rank {self.rank}: waiting for local rank 0 to build {err}", flush=True)
                    announced = True
                time.sleep(1)

    def start(self, out):
        """Starts the process group; checks that every process sees the same --out (one shared folder)."""
        if not self.on:
            return
        dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.started = True
        name = [f".ranks-{uuid.uuid4().hex}"]  # a file rank 0 writes in its --out, looked for in each rank's --out
        if self.master:
            open(os.path.join(out, name[0]), "w").close()
        dist.broadcast_object_list(name, src=0)
        probe = os.path.join(out, name[0])
        blind = [rank for rank, seen in enumerate(self.gather(os.path.isfile(probe))) if not seen]
        self.barrier()
        if self.master:
            os.remove(probe)
        if blind:
            raise DataError(f"--out {out}: rank(s) {blind} do not see rank 0's files there; every machine must "
                            "reach the same --out (shared storage)")

    def stop(self):
        if self.started:
            dist.destroy_process_group()

    def barrier(self):
        if self.on:
            dist.barrier()

    def sharded(self, fn, dataset):
        """fn on each rank's share of dataset (every world-th item), its arrays gathered back into dataset order."""
        rows = np.arange(len(dataset))
        parts = self.gather(fn(torch.utils.data.Subset(dataset, rows[self.rank::self.world])))
        order = np.argsort(np.concatenate([rows[r::self.world] for r in range(self.world)]), kind="stable")
        return tuple(np.concatenate([p[k] for p in parts])[order] for k in range(len(parts[0])))

    def gather(self, obj):
        """Every rank's obj, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def say(self, message):
        """Rank 0 alone talks."""
        if self.master:
            print(message, flush=True)


class Clock:
    """Seconds (and images per second) of each stage, for the line a run ends with: a reader sets it beside README's."""

    def __init__(self):
        self.start, self.parts = time.time(), []

    def add(self, name, seconds, images=0):
        self.parts.append((name, seconds, images))

    def line(self):
        parts = [f"{name} {s:.0f} s" + (f" ({n / s:.0f} img/s)" if n else "") for name, s, n in self.parts]
        return f"time: {time.time() - self.start:.0f} s in all; " + ", ".join(parts)
