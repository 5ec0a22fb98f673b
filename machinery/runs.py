"""
What a training run keeps track of, beyond the method: its folder's name and reuse, its log.csv, its processes under
torchrun and its clock: train.py's machinery, kept out of the reader's way (runtime.py holds what it shares with
evaluate.py).

    RunFolders(args, info, device)    teacher-224-<hash>, baseline-28-<hash>, mlcak-28-<hash>: named by every flag
                                      that changes a run's numbers, so a finished run is reused and a changed flag
                                      trains anew (claim); interrupted runs of the same data found for --resume
    Run(role, res, run_dir, model)    one model's run around the paper's step: AdamW and its schedule, --resume,
                                      DDP and compile, progress lines, log.csv, best.pt and last.pt
    finished(run_dir, epochs)         a run that reached its last epoch with finite weights
    EpochLog(run_dir)                 log.csv, one row per epoch
    Ddp(device)                       torchrun's environment: ranks, the process group, gathering
    Clock                             each stage's seconds, for the line a run ends with
"""

import contextlib
import csv
import hashlib
import json
import math
import os
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from machinery.layouts import DataError, read_csv
from machinery.runtime import (CheckpointError, Lock, NotReady, TrainingError, atomic_open, first_line, free_space,
                               read_checkpoint, save_checkpoint)
from vit import VARIANTS

# the flags that change a run's numbers: each is in its run folder's name (RunFolders), directly or through the caches
# (--data, --uncertain, --views, --boxes); the others cannot change a number (--device only beyond rounding among fp32
# devices); and four choose which runs are made, each run's resolution and role naming its folder
FLAGS_THAT_MATTER = ("data", "model", "img_size", "epochs", "batch_size", "lr", "weight_decay", "warmup", "alpha", "beta",
                     "gamma", "teacher", "readers", "uncertain", "views", "boxes", "val_fraction", "init", "init_norm",
                     "amp", "tf32", "compile", "seed")
FLAGS_THAT_DO_NOT = ("bootstrap", "out", "cache_dir", "rebuild_cache", "device", "workers", "resume", "log_every")
FLAGS_THAT_CHOOSE_RUNS = ("res", "no_kd", "compare", "teacher_only")


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
        teacher_recipe = dict(self.recipe, seed=stage_seed(args.seed, "teacher"))
        self.teacher = os.path.join(args.out, f"teacher-{args.img_size}-{short_hash(teacher_recipe)}")
        self.teacher_checkpoint = args.teacher or os.path.join(self.teacher, "best.pt")
        # an mlcak student is tied to its teacher: a given --teacher file, or the one this recipe trains
        self.teacher_key = short_hash(args.teacher + str(os.path.getmtime(args.teacher))) if args.teacher else short_hash(teacher_recipe)

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


    @contextlib.contextmanager
    def claim(self, role, res, run_dir, ddp):
        """Holds run_dir's lock (a second process with the same flags waits, then finds the run done) and yields
        whether the run is to be trained: False where a finished run of these flags is there to be reused."""
        with Lock(os.path.join(run_dir, ".lock"), f"the run {run_dir}", enabled=ddp.master):
            if finished(run_dir, self.args.epochs):
                ddp.say(f"{role}@{res}: reusing {run_dir}")
                yield False
                return
            if self.args.resume and not os.path.isfile(os.path.join(run_dir, "last.pt")):
                others = "; ".join(self.interrupted(role, res, run_dir)) or "none"
                ddp.say(f"{role}@{res}: --resume: no interrupted run of these settings ({run_dir}), so it starts from "
                        f"the beginning; interrupted runs of this data under other settings: {others}")
            yield True


def stage_seed(seed, role):
    """The seed of a stage's initial weights and data order: --seed for the students, --seed + 1000 for the teacher,
    a separate model as in the paper, which never starts from the students' weights nor sees their data order."""
    return seed + 1000 if role == "teacher" else seed


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
            try:  # as a spreadsheet may have saved it: ';' or tabs, a byte-order mark, UTF-16
                _, rows = read_csv(self.path, ["epoch"])
                self.rows = [r for r in rows if int(float(r["epoch"])) <= after_epoch]
            except (DataError, ValueError) as err:
                print(f"{self.path}: its rows cannot be read ({err}); it starts anew from epoch {after_epoch + 1}")

    def add(self, **row):
        self.rows.append(row)
        columns = list(dict.fromkeys(k for r in self.rows for k in r))  # ours, and any a spreadsheet added
        try:  # the whole file, renamed into place: a crash leaves the old one, never half a row
            with atomic_open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, columns, restval="")
                writer.writeheader()
                writer.writerows(self.rows)
        except OSError as err:
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


def lr_factor(step, total, warmup):
    """The learning rate, as a share of --lr, at a step: linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


class Run:
    """
    One model's training run, all of it but the paper's step (train.train): AdamW with weight decay on the weight
    matrices (not on biases, norms and embeddings), linear warmup over --warmup of the steps then cosine decay
    (lr_factor); --resume from last.pt (model, optimizer, schedule, RNG state); torch.compile and DDP around the
    model (self.model; the unwrapped self.raw is what is saved, so no key carries 'module.' or '_orig_mod.'); a
    progress line every --log-every steps and a stop at a non-finite loss (step); log.csv, best.pt (the best
    validation mean local AUROC, or the last epoch where there is none) and last.pt (end_epoch).
    """

    def __init__(self, role, res, run_dir, model, steps_per_epoch, args, ddp, saved):
        self.role, self.run_dir, self.args, self.ddp, self.saved = role, run_dir, args, ddp, saved
        os.makedirs(run_dir, exist_ok=True)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (decay if p.ndim >= 2 and name not in ("pos_embed", "cls_token") else no_decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
        self.steps_per_epoch, self.total = steps_per_epoch, args.epochs * steps_per_epoch
        warmup = max(1, int(args.warmup * self.total))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, self.total, warmup))
        self.raw = model
        self.first_epoch, self.best, self.step = 0, -1.0, 0
        self.last_path = os.path.join(run_dir, "last.pt")
        if args.resume and os.path.isfile(self.last_path):
            last = read_checkpoint(self.last_path)
            model.load_state_dict(last["model"])
            self.optimizer.load_state_dict(last["optimizer"])
            self.scheduler.load_state_dict(last["scheduler"])
            torch.set_rng_state(last["rng"])
            self.first_epoch, self.best, self.step = last["epoch"], last["best"], last["step"]
            ddp.say(f"{role}: resuming {self.last_path} after epoch {self.first_epoch}")
        if args.compile:
            model = torch.compile(model)
        if ddp.on:
            device = ddp.device
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = model
        ddp.say(f"{role}: {sum(p.numel() for p in self.raw.parameters()) / 1e6:.2f}M parameters, res {res}, {self.total} "
                f"steps, {'L_KD + L_cls' if saved['kd'] else 'L_cls'}, run folder {run_dir}")
        self.log = EpochLog(run_dir, after_epoch=self.first_epoch)
        self.start, self.start_step = time.time(), self.step

    def epochs(self):
        """The epochs still to train (all, or those after the one --resume found)."""
        for epoch in range(self.first_epoch, self.args.epochs):
            self.epoch_start, self.sums = time.time(), {}
            yield epoch

    def after_step(self, epoch, terms):
        """Counts the step, sums its loss terms for log.csv, stops at a non-finite loss, prints progress."""
        self.step += 1
        self.sums = {k: self.sums.get(k, 0) + v for k, v in terms.items()}
        if not torch.isfinite(terms["total"]):  # a host sync, but a NaN run must stop at once, not train on to the end
            parts = " ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
            raise TrainingError(f"{self.role}: the loss is not finite at step {self.step} ({parts}); nothing of this "
                                  "step was saved; try a lower --lr")
        if self.ddp.master and (self.step % self.args.log_every == 0 or self.step == self.total):
            rate = (self.step - self.start_step) * self.args.batch_size / (time.time() - self.start)
            parts = " ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
            print(f"{self.role} epoch {epoch + 1}/{self.args.epochs} step {self.step}/{self.total} | {parts} | "
                  f"{rate:.0f} img/s, ETA {(self.total - self.step) * self.args.batch_size / rate:.0f}s", flush=True)

    def end_epoch(self, epoch, val):
        """After an epoch's validation (evaluate.summary, or None): log.csv's row, best.pt and last.pt."""
        score = val["mean_local_auroc"] if val else float("nan")
        metrics = dict(epoch=epoch + 1, val_mean_local_auroc=score,
                       val_normal_abnormal_auroc=val["normal_abnormal_auroc"] if val else None)
        if self.ddp.master:
            if val:
                print(f"{self.role} epoch {epoch + 1}: val mean local AUROC {score:.3f} ({val['labels_defined']} labels), "
                      f"normal/abnormal {val['normal_abnormal_auroc']:.3f}")
            seconds = time.time() - self.epoch_start
            lr = self.args.lr * self.scheduler.lr_lambdas[0](self.step - 1)  # the epoch's last step's (the schedule moved on)
            self.log.add(epoch=epoch + 1, step=self.step, lr=f"{lr:.6g}",
                         **{k: f"{float(v) / self.steps_per_epoch:.6g}" for k, v in self.sums.items()},
                         val_mean_local_auroc=score, val_normal_abnormal_auroc=metrics["val_normal_abnormal_auroc"],
                         seconds=f"{seconds:.2f}", images_per_second=f"{self.steps_per_epoch * self.args.batch_size / seconds:.1f}")
            if math.isnan(score) or score > self.best:  # no validation score: best = last
                self.best = score if not math.isnan(score) else self.best
                save_checkpoint(os.path.join(self.run_dir, "best.pt"), self.raw, epoch=epoch + 1, step=self.step,
                                metrics=metrics, **self.saved)
            save_checkpoint(self.last_path, self.raw, epoch=epoch + 1, step=self.step, metrics=metrics, best=self.best,
                            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                            rng=torch.get_rng_state(), **self.saved)
        self.ddp.barrier()

    def images(self):
        """The images trained on in this process's run, and the rate its progress lines gave (bench.py compares it)."""
        images = (self.step - self.start_step) * self.args.batch_size
        return images, images / (time.time() - self.start)
