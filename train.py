"""
Trains MLCAK (arXiv 2405.13370) in the paper's two stages and prints AUROC on the test set.

    Stage 1  the teacher: a ViT at high resolution (--img-size, 224), L_cls alone
    Stage 2  the students: the same ViT at low resolution (--res), either
             mlcak     L_joint = L_KD + L_cls against the frozen teacher, or
             baseline  L_cls alone (--no-kd)

    python train.py --res 28                 # synthetic VinDr-style data (made on first use), CPU, a few minutes
    python train.py --res 28 --no-kd         # the baseline: the same recipe with L_cls only
    python train.py --res 112 56 28 --compare   # baseline and mlcak at each resolution: the paper's table
    python train.py --data /data/vindr-cxr --model vit_small --device cuda --epochs 30 --batch-size 128 --res 28

Several GPUs or machines (DistributedDataParallel; --batch-size stays the global batch; --out must be a folder
that every machine shares, and is checked):

    torchrun --standalone --nproc_per_node=4 train.py --data /data/vindr-cxr --model vit_small --device cuda --amp

Each model gets a run folder under --out (teacher-224-*, mlcak-28-*, baseline-28-*), named by everything that
determines its result, so a finished run is reused rather than trained again. It holds best.pt (by validation
mean local AUROC) and last.pt: plain dicts of tensors and values, loadable with torch.load(path, weights_only=True).
"""

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

import data
import layouts
import synthetic
from evaluate import (evaluate_checkpoints, format_table, label_groups, markdown_table, metrics, pick_rows, predict,
                      write_figures)
from mlcak import joint_loss, model_input, teacher_targets
from runtime import (CheckpointError, Lock, Parser, first_line, load_checkpoint, load_weights, pick_device, read_checkpoint,
                     run_cli, save_checkpoint, writable)
from vit import CHECKPOINT_NORMS, VARIANTS, ViTConfig, VisionTransformer, adapt_timm_state_dict

NORM = (0.5, 0.25)  # input normalization, (x - mean) / std, saved with every checkpoint


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss, a teacher that does not fit); the message is one line."""


# -------------------------------------------------------------------------------------------------- the run

def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights everywhere
    ddp, clock = Ddp(pick_device(args.device), args.tf32), Clock()
    try:
        train_set, val_set, test_set, info = prepare_data(args, ddp, clock)  # before the process group: see Ddp
        ddp.start(args.out)
        cfg = ViTConfig(img_size=args.img_size, num_local=len(train_set.label_names), **VARIANTS[args.model])
        folders = RunFolders(args, info, ddp.device)

        def fit(role, run_dir, res, teacher=None):
            train_or_reuse(role, run_dir, cfg, train_set, val_set, res, args, ddp, info, clock, folders, teacher)

        # Stage 1: the teacher sees the full-resolution image and learns from the labels alone
        teacher = None
        if "mlcak" in methods(args):
            if args.teacher:
                say(ddp, f"teacher: {args.teacher}")
            else:
                fit("teacher", folders.teacher, args.img_size)
            teacher, ckpt = load_checkpoint(folders.teacher_checkpoint, ddp.device)  # eval mode, never wrapped in DDP
            check_teacher(ckpt, folders.teacher_checkpoint, cfg, train_set.label_names)
            teacher.requires_grad_(False)
            if args.compile:
                teacher = torch.compile(teacher)

        # Stage 2: each student sees the image at --res; mlcak also learns from the frozen teacher
        table, pairs = [], []
        if os.path.isfile(folders.teacher_checkpoint):
            table.append(folders.teacher_checkpoint)
        for res in args.res:
            column = {}
            for method in ("baseline", "mlcak"):
                run_dir = folders.student(method, res)
                if method in methods(args):
                    fit(method, run_dir, res, teacher if method == "mlcak" else None)
                if os.path.isfile(os.path.join(run_dir, "best.pt")):  # trained now, or earlier: shown side by side
                    column[method] = len(table)
                    table.append(os.path.join(run_dir, "best.pt"))
            if len(column) == 2:
                pairs.append((column["baseline"], column["mlcak"]))  # mlcak - baseline at this resolution, paired

        if ddp.master:
            start = time.time()
            report(args, table, pairs, test_set, info, ddp.device)
            clock.add("evaluation", time.time() - start)
            print(clock.line())
    finally:
        ddp.stop()


def methods(args):
    """Which students this command trains."""
    if args.compare:
        return ["baseline", "mlcak"]
    if args.no_kd:
        return ["baseline"]
    return ["mlcak"]


def report(args, table, pairs, test_set, info, device):
    """The final AUROC table on the test set; with --compare also the Markdown table and attention maps."""
    results = evaluate_checkpoints(table, test_set, device, args.bootstrap, pairs, groups=label_groups(info["path"]))
    print(f"\ntest set: {len(test_set)} images ({info['path']})")
    print(format_table(results))
    if args.compare:
        name = os.path.join(args.out, f"table-{short_hash(table)}")
        with open(name + ".md", "w") as f:
            f.write(f"Test set: {len(test_set)} images of {info['path']}; intervals from {args.bootstrap} bootstrap "
                    f"resamples.\n\n{markdown_table(results)}\n")
        loaded = [load_checkpoint(p, device) for p in table]
        write_figures(name + "-maps", test_set, loaded, pick_rows(test_set), device)
        print(f"wrote {name}.md and attention maps in {name}-maps/")


class Clock:
    """Seconds (and images per second) of each stage, for the line a run ends with: a reader sets it beside README's."""

    def __init__(self):
        self.start, self.parts = time.time(), []

    def add(self, name, seconds, images=0):
        self.parts.append((name, seconds, images))

    def line(self):
        parts = [f"{name} {s:.0f} s" + (f" ({n / s:.0f} img/s)" if n else "") for name, s, n in self.parts]
        return f"time: {time.time() - self.start:.0f} s in all; " + ", ".join(parts)


def check_teacher(ckpt, path, cfg, label_names):
    """A teacher is a model trained as one, on the full-resolution image; it must predict the same labels and give
    MLCAK maps of the same size as the student's."""
    role, res, size = ckpt.get("role"), ckpt.get("res"), ckpt["vit_config"]["img_size"]
    if role != "teacher" or res != size:
        raise TrainingError(f"--teacher {path}: a {role} model that sees {res} px images, not a teacher (which sees "
                            f"--img-size {cfg.img_size}); give a teacher-{cfg.img_size}-*/best.pt")
    if ckpt["label_names"] != label_names:
        first = next((n for n, (a, b) in enumerate(zip(ckpt["label_names"], label_names)) if a != b), None)
        where = (f"label {first + 1} is '{ckpt['label_names'][first]}', here '{label_names[first]}'" if first is not None
                 else f"it has {len(ckpt['label_names'])} labels, this data {len(label_names)}")
        raise TrainingError(f"--teacher {path}: trained on other labels ({where})")
    size = ckpt["vit_config"]["img_size"]
    tokens = (size // ckpt["vit_config"]["patch_size"]) ** 2 + 1  # T, the class token included
    student_tokens = (cfg.img_size // cfg.patch_size) ** 2 + 1
    if size != cfg.img_size or tokens != student_tokens:
        raise TrainingError(f"--teacher {path}: sees {size} px in {tokens} tokens, the students {cfg.img_size} px in "
                            f"{student_tokens} tokens; the MLCAK maps must match")


# -------------------------------------------------------------------------------------------------- training

def train_or_reuse(role, run_dir, cfg, train_set, val_set, res, args, ddp, info, clock, folders, teacher=None):
    """Trains one model into run_dir, unless a finished run of the same settings is already there. One process trains
    a run folder at a time: a second one started on it waits, then reuses what the first finished."""
    with contextlib.ExitStack() as stack:
        if ddp.master:
            stack.enter_context(Lock(os.path.join(run_dir, ".lock"), f"the run {run_dir}"))
        if finished(run_dir, args.epochs):
            say(ddp, f"{role}@{res}: reusing {run_dir}")
            return
        if args.resume and not os.path.isfile(os.path.join(run_dir, "last.pt")):
            others = folders.interrupted(role, res, run_dir)
            say(ddp, f"{role}@{res}: --resume: no interrupted run of these settings ({run_dir}), so it starts from the "
                     "beginning" + (f"; interrupted runs of this data under other settings: {'; '.join(others)}" if others
                                    else ""))
        start = time.time()
        images, _ = train(role, initial_model(cfg, args, ddp), run_dir, train_set, val_set, res, args, ddp, info, teacher)
        clock.add(f"{role}@{res}", time.time() - start, images)


def finished(run_dir, epochs):
    """A run that reached its last epoch with finite weights; anything else is trained (or resumed) again."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.isfile(path):
        return False
    last = read_checkpoint(path)
    return last["epoch"] == epochs and all(torch.isfinite(v).all() for v in last["model"].values())


def initial_model(cfg, args, ddp):
    torch.manual_seed(args.seed)  # per stage: a student starts the same whether or not a teacher trained before it
    model = VisionTransformer(cfg)
    if args.init:
        state = load_weights(args.init)
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TrainingError(f"--init {args.init}: not a state_dict (a dict of tensors, or a dict with one under 'model')")
        try:
            state, report = adapt_timm_state_dict(state, model, args.init_norm, NORM)
            model.load_state_dict(state, strict=False)
        except Exception as err:  # not a ViT of this width; whatever else, one line and never a traceback
            raise TrainingError(f"--init {args.init}: {err if isinstance(err, ValueError) else first_line(err)}") from None
        say(ddp, f"init: {args.init}: {len(report['loaded'])} tensors loaded, converted {report['converted']}, "
                 f"dropped {report['dropped']}, heads new")
    return model.to(ddp.device)


def lr_factor(step, total, warmup):
    """The learning rate, as a share of --lr, at a step: linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(role, model, run_dir, train_set, val_set, res, args, ddp, info, teacher=None):
    """
    One training run: AdamW, warmup + cosine, validation each epoch, best.pt and last.pt in run_dir. Returns the
    number of images trained on and the loop's images per second (validation and checkpoints included).
    """
    device, kd = ddp.device, teacher is not None
    need_attn = kd and args.gamma != 0
    os.makedirs(run_dir, exist_ok=True)
    decay, no_decay = [], []  # weight decay on the weight matrices, not on biases, norms and embeddings
    for name, p in model.named_parameters():
        if p.ndim >= 2 and name not in ("pos_embed", "cls_token"):
            decay.append(p)
        else:
            no_decay.append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.amp)
    stage = StageData(train_set, res, teacher, need_attn, autocast, args, ddp)
    if stage.steps == 0:
        raise TrainingError(f"--batch-size {args.batch_size} is more than the {len(train_set)} training images: "
                            "not one step would run; lower --batch-size")
    total = args.epochs * stage.steps
    warmup = max(1, int(args.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup))
    raw = model  # what is saved: never the DDP or compiled wrapper, so keys carry no 'module.' or '_orig_mod.'
    first_epoch, best, step = 0, -1.0, 0
    last_path = os.path.join(run_dir, "last.pt")
    if args.resume and os.path.isfile(last_path):
        last = read_checkpoint(last_path)
        raw.load_state_dict(last["model"])
        opt.load_state_dict(last["optimizer"])
        sched.load_state_dict(last["scheduler"])
        torch.set_rng_state(last["rng"])
        first_epoch, best, step = last["epoch"], last["best"], last["step"]
        say(ddp, f"{role}: resuming {last_path} after epoch {first_epoch}")
    if args.compile:
        model = torch.compile(model)
    if ddp.on:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    say(ddp, f"{role}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, res {res}, {total} steps, "
             f"{'L_KD + L_cls' if kd else 'L_cls'}, run folder {run_dir}")
    saved = dict(args=vars(args), role=role, res=res, kd=kd, norm=list(NORM), label_names=train_set.label_names, data=info)
    start, start_step = time.time(), step
    for epoch in range(first_epoch, args.epochs):
        model.train()
        for x, local, abnormal, teacher_out in stage.batches(epoch):
            with autocast():
                student_out = model(x, return_attn=need_attn)
                loss, terms = joint_loss(student_out, (local, abnormal), teacher_out, args.alpha, args.beta, args.gamma)
            del student_out, teacher_out  # the attention maps of this step are not kept alive into the next forward
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if not torch.isfinite(loss):  # a host sync, but a NaN run must stop at once, not train on to the end
                parts = " ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                raise TrainingError(f"{role}: the loss is not finite at step {step} ({parts}); nothing of this step "
                                    "was saved; try a lower --lr")
            if ddp.master and (step % args.log_every == 0 or step == total):
                rate = (step - start_step) * args.batch_size / (time.time() - start)
                parts = " ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                print(f"{role} epoch {epoch + 1}/{args.epochs} step {step}/{total} | {parts} | "
                      f"{rate:.0f} img/s, ETA {(total - step) * args.batch_size / rate:.0f}s", flush=True)
        val = metrics(*sharded_predict(raw, val_set, res, ddp), val_set.label_names) if len(val_set) else None
        score = val["mean_local_auroc"] if val else float("nan")
        summary = dict(epoch=epoch + 1, val_mean_local_auroc=score,
                       val_normal_abnormal_auroc=val["normal_abnormal_auroc"] if val else None)
        if ddp.master:
            if val:
                print(f"{role} epoch {epoch + 1}: val mean local AUROC {score:.3f} ({val['labels_defined']} labels), "
                      f"normal/abnormal {val['normal_abnormal_auroc']:.3f}")
            if math.isnan(score) or score > best:  # no validation score: best = last
                best = score if not math.isnan(score) else best
                save_checkpoint(os.path.join(run_dir, "best.pt"), raw, epoch=epoch + 1, step=step, metrics=summary, **saved)
            save_checkpoint(last_path, raw, epoch=epoch + 1, step=step, metrics=summary, best=best, optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), rng=torch.get_rng_state(), **saved)
        ddp.barrier()
    images = (step - start_step) * args.batch_size
    return images, images / (time.time() - start)  # and the rate its progress lines give (bench.py compares it)


class StageData:
    """
    What the steps of one stage read: the model's input (mlcak.model_input at the stage's resolution), the labels
    and, for mlcak, the frozen teacher's targets (mlcak.teacher_targets: its probabilities and its MLCAK map).
    Nothing here changes between epochs (train.py does not augment, and the teacher is frozen in eval mode), so
    where it fits in memory it is computed once for every training image: the steps then spend no time on the
    low-resolution simulation, the teacher's forward pass or the loader. Otherwise each batch is loaded and
    computed at its step, as the paper's loss reads. Both give the same batches in the same order.
    """

    LIMIT = 4 * 2 ** 30  # bytes kept in memory at most

    def __init__(self, dataset, res, teacher, need_attn, autocast, args, ddp):
        self.dataset, self.res, self.teacher, self.need_attn, self.autocast = dataset, res, teacher, need_attn, autocast
        self.args, self.device = args, ddp.device
        # the same sampler with one process or many: rank r takes every world-th image of one seeded permutation, so
        # N processes with batch B/N see, step by step, the same images as one process with batch B
        self.sampler = torch.utils.data.DistributedSampler(dataset, ddp.world, ddp.rank, shuffle=True, seed=args.seed, drop_last=True)
        self.batch_sampler = torch.utils.data.BatchSampler(self.sampler, args.batch_size // ddp.world, drop_last=True)
        self.steps = len(self.batch_sampler)
        S, T, L = args.img_size, (args.img_size // VARIANTS[args.model].get("patch_size", 16)) ** 2 + 1, len(dataset.label_names)
        per_image = S * S + L + 1  # float32 values: the model input, the local targets, abnormal
        if teacher is not None:
            per_image += L + 2 + (T * T if need_attn else 0)  # the teacher's probabilities and its MLCAK map
        size = 4 * len(dataset) * per_image
        self.table = None
        if size <= self.LIMIT:
            loader = torch.utils.data.DataLoader(dataset, batch_size=128, num_workers=args.workers)
            parts = [self.compute(images, local, abnormal) for images, local, abnormal, _ in loader]
            self.table = [None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(6)]

    @torch.no_grad()
    def compute(self, images, local, abnormal):
        """(model input, local, abnormal, p_local^T, p_global^T, MLCAK^T) of a batch; the teacher's None for others."""
        images = images.to(self.device, non_blocking=True)
        x = model_input(images, self.res, NORM)
        teacher = (None, None, None)
        if self.teacher is not None:
            with self.autocast():
                teacher = teacher_targets(self.teacher(model_input(images, self.args.img_size, NORM), return_attn=self.need_attn))
        return (x, local.to(self.device, non_blocking=True), abnormal.to(self.device, non_blocking=True), *teacher)

    def batches(self, epoch):
        """(model input, local targets, abnormal, teacher targets or None) for each step of an epoch."""
        self.sampler.set_epoch(epoch)
        if self.table is not None:
            for positions in self.batch_sampler:
                index = torch.tensor(positions, device=self.device)
                x, local, abnormal, *teacher = (None if part is None else part[index] for part in self.table)
                yield x, local, abnormal, (tuple(teacher) if self.teacher is not None else None)
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=self.args.workers,
                                             pin_memory=self.device.type == "cuda")
        for images, local, abnormal, _ in loader:
            x, local, abnormal, *teacher = self.compute(images, local, abnormal)
            yield x, local, abnormal, (tuple(teacher) if self.teacher is not None else None)


def sharded_predict(model, dataset, res, ddp):
    """predict over each rank's share of the images, gathered back into dataset order."""
    rows = np.arange(len(dataset))
    mine = torch.utils.data.Subset(dataset, rows[ddp.rank::ddp.world])
    parts = ddp.gather(predict(model, mine, res, NORM, ddp.device))
    order = np.argsort(np.concatenate([rows[r::ddp.world] for r in range(ddp.world)]), kind="stable")
    return tuple(np.concatenate([p[k] for p in parts])[order] for k in range(4))


# -------------------------------------------------------------------------------------------------- data

def prepare_data(args, ddp, clock):
    """
    The train, validation and test sets. The first process on each machine (LOCAL_RANK 0) makes the data and the
    caches; the others wait for them to be complete, then read them.
    """
    announced = False
    while True:
        try:
            return read_data(args, ddp, clock, create=ddp.builder)
        except data.NotReady as err:
            if not announced:
                print(f"rank {ddp.rank}: waiting for local rank 0 to build {err}", flush=True)
                announced = True
            time.sleep(1)


def read_data(args, ddp, clock, create):
    start = time.time()
    path = args.data or synthetic.make_synthetic(os.path.join(data.DEFAULT_DATA, "synthetic"), verbose=ddp.master, create=create)
    clock.add("data", time.time() - start)
    sources = layouts.load_sources(path, args.readers, args.uncertain, args.views, args.boxes)
    start = time.time()
    caches = {split: data.build_cache(s, args.img_size, args.cache_dir, verbose=ddp.master, create=create,
                                      rebuild=args.rebuild_cache) for split, s in sources.items()}
    clock.add("cache", time.time() - start)
    train_all, test_set = data.XrayDataset(caches["train"]), data.XrayDataset(caches["test"])
    val_rows = data.validation_rows(train_all, args.val_fraction)
    train_set = data.XrayDataset(caches["train"], np.setdiff1d(train_all.indices, val_rows))
    val_set = data.XrayDataset(caches["train"], val_rows)
    notes = sources["train"].notes + sources["test"].notes
    notes += data.overlap_notes({"train": train_set, "val": val_set, "test": test_set})
    if not len(val_set):
        why = (f"{len(train_all)} training images are too few for --val-fraction {args.val_fraction}" if args.val_fraction
               else "--val-fraction 0")
        notes.append(f"no validation image ({why}): the model of the last epoch is kept (best = last)")
    elif not any(0 < c < len(val_set) for c in val_set.local[val_set.indices].sum(0)):
        notes.append(f"the {len(val_set)} validation images have no label with both classes: AUROC is undefined, best = last")
    for name, ds in (("train", train_set), ("test", test_set)):
        missing = [n for n, c in zip(ds.label_names, ds.local[ds.indices].sum(0)) if c == 0]
        if missing:
            consequence = "their AUROC is n/a" if name == "test" else "the model cannot learn them"
            notes.append(f"{name} has no positive case of {len(missing)} label(s): {', '.join(missing)}; {consequence}")
        abnormal = int(ds.abnormal[ds.indices].sum())
        if abnormal in (0, len(ds)):
            notes.append(f"{name}: all {len(ds)} images are {'abnormal' if abnormal else 'normal'}: normal/abnormal "
                         f"{'AUROC is n/a' if name == 'test' else 'cannot be learnt'}")
        if ds.bad_boxes:
            notes.append(f"{name}: {len(ds.bad_boxes)} boxes are empty or leave their image and are not used (the "
                         f"localization never counts them); first: {ds.bad_boxes[0]}")
    for note in notes + [f"{path}: {len(train_set)} train, {len(val_set)} val, {len(test_set)} test images, "
                         f"{len(train_set.label_names)} local labels"]:
        say(ddp, f"data: {note}")
    return train_set, val_set, test_set, dict(path=path, train_cache=caches["train"], test_cache=caches["test"])


class RunFolders:
    """
    Run folders named by a hash of every setting that changes their numbers, so a finished run is found and reused
    and a changed flag trains anew: the recipe below (the data by their caches, whose names hold the files, labels
    and boxes), bf16 (--amp), TF32 where CUDA uses it, --compile, and for mlcak its teacher and alpha, beta, gamma.
    Left out, as they cannot change a number: --workers, --log-every, --bootstrap, --out, --cache-dir,
    --rebuild-cache, --resume (bitwise on CPU), and --device among fp32 devices (beyond rounding).
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


# -------------------------------------------------------------------------------------------------- processes

class Ddp:
    """
    torchrun's environment, nanoGPT-style: one process per device; global rank 0 logs, saves and evaluates. The
    process group starts only once the data are ready (start), so no collective waits, and times out, while a
    machine decodes a large dataset into its cache; the first process of each machine builds that machine's cache.
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
            raise data.DataError(f"--out {out}: rank(s) {blind} do not see rank 0's files there; every machine must "
                                 "reach the same --out (shared storage)")

    def stop(self):
        if self.started:
            dist.destroy_process_group()

    def barrier(self):
        if self.on:
            dist.barrier()

    def gather(self, obj):
        """Every rank's obj, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def say(ddp, message):
    """Rank 0 alone talks."""
    if ddp.master:
        print(message, flush=True)


# -------------------------------------------------------------------------------------------------- command line

# the flags that change a run's numbers: each is in its run folder's name (RunFolders), directly or through the caches;
# the others cannot change a number (--device only beyond rounding among fp32 devices)
FLAGS_THAT_MATTER = ("data", "model", "img_size", "epochs", "batch_size", "lr", "weight_decay", "warmup", "alpha", "beta",
                     "gamma", "teacher", "readers", "uncertain", "views", "boxes", "val_fraction", "init", "init_norm",
                     "amp", "tf32", "compile", "seed")
FLAGS_THAT_DO_NOT = ("bootstrap", "out", "cache_dir", "rebuild_cache", "device", "workers", "resume", "log_every")
FLAGS_THAT_CHOOSE_RUNS = ("res", "no_kd", "compare")  # which runs are made: each run's resolution and role name its folder


def build_parser():
    p = Parser(description="Train an MLCAK teacher (HR) and students (LR), then test them. Every flag that changes the "
               "numbers names the run folder, so a finished run is reused only under the same flags; --workers, "
               "--log-every, --bootstrap, --out, --cache-dir, --rebuild-cache, --resume and --device (among fp32 "
               "devices) cannot change them and are left out.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--res", type=int, nargs="+", default=[28], help="student resolution(s): 112, 56, 28 or any value from 8 to --img-size")
    p.add_argument("--data", help="dataset folder or CSV file in a layout of README's 'Data' (default: synthetic VinDr-style data in data/synthetic)")
    p.add_argument("--model", default="vit_cpu", choices=sorted(VARIANTS), help="ViT variant for teacher and students")
    p.add_argument("--img-size", type=int, default=224, help="high resolution: the teacher's input side")
    p.add_argument("--epochs", type=int, default=30, help="epochs for each stage")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, linear warmup then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases, norms, embeddings)")
    p.add_argument("--warmup", type=float, default=0.1, help="share of the steps spent warming up")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of MSE on the local (MLCT) probabilities")
    p.add_argument("--beta", type=float, default=1.0, help="weight of MSE on the global (MCCT) probabilities")
    p.add_argument("--gamma", type=float, default=1000.0, help="weight of MSE on the MLCAK attention maps")
    p.add_argument("--no-kd", action="store_true", help="train the baseline student: L_cls only, no teacher")
    p.add_argument("--compare", action="store_true", help="train baseline and mlcak students at every --res; write a Markdown table and attention maps")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals of the final table (0: none)")
    p.add_argument("--teacher", help="teacher checkpoint to distil from (default: train one, or reuse it from --out)")
    p.add_argument("--readers", default="majority", choices=["majority", "any"], help="how the readers of a VinDr image are combined")
    p.add_argument("--uncertain", default="zeros", choices=["zeros", "ones"], help="what an uncertain label (-1, as in CheXpert) counts as")
    p.add_argument("--views", default="frontal", choices=["frontal", "all"], help="CheXpert: frontal views only, or lateral ones too")
    p.add_argument("--boxes", help="boxes CSV for a CSV dataset (default: boxes.csv beside it, if there)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of training patients (or images) held out for validation, unless the data name their own")
    p.add_argument("--out", default="runs", help="folder of the run folders")
    p.add_argument("--cache-dir", help="where decoded images are cached (default: data/cache in this project)")
    p.add_argument("--rebuild-cache", action="store_true", help="decode every image again, although the cache's key (each "
                   "file's size, modification and change time) says it is unchanged")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="CUDA: full fp32 matrix products instead of TF32")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--init", help="start teacher and students from a timm/DeiT ViT checkpoint (state_dict, or a dict with 'model')")
    p.add_argument("--init-norm", default="imagenet", choices=sorted(CHECKPOINT_NORMS), help="input normalization the --init checkpoint was trained with")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs from their last.pt (model, optimizer, schedule, epoch)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for forward and loss")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained model and the frozen teacher")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization and data order")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for r in sorted({r for r in args.res if args.res.count(r) > 1}):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"--res {r} is given {args.res.count(r)} times: its models are trained and shown once")
    args.res = list(dict.fromkeys(args.res))  # in the order given, each once
    patch = VARIANTS[args.model].get("patch_size", 16)
    checks = [
        (args.img_size >= patch and args.img_size % patch == 0,
         f"--img-size must be a multiple of {args.model}'s patch size {patch}, got {args.img_size}"),
        (all(8 <= r <= args.img_size for r in args.res), f"--res must be between 8 and --img-size ({args.img_size}), got {args.res}"),
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be 0 or more, got {args.weight_decay}"),
        (0 <= args.warmup < 1, f"--warmup must be in [0, 1), got {args.warmup}"),
        (min(args.alpha, args.beta, args.gamma) >= 0, "--alpha, --beta and --gamma must be 0 or more"),
        (0 <= args.val_fraction < 1, f"--val-fraction must be in [0, 1), got {args.val_fraction}"),
        (min(args.bootstrap, args.workers) >= 0 and args.log_every >= 1, "--bootstrap and --workers must be 0 or more, --log-every at least 1"),
        (args.data is None or os.path.exists(args.data), f"--data {args.data}: no such file or folder"),
        (args.boxes is None or os.path.isfile(args.boxes), f"--boxes {args.boxes}: no such file"),
        (args.teacher is None or os.path.isfile(args.teacher), f"--teacher {args.teacher}: no such file"),
        (args.init is None or os.path.isfile(args.init), f"--init {args.init}: no such file"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    try:
        pick_device(args.device)
    except ValueError as err:
        p.error(str(err))
    problem = writable(args.out)
    if problem:
        p.error(f"--out {args.out}: cannot write there ({problem})")
    return args


def cli(argv=None):
    """main, with the command line's exit codes: a bad input or a failed run is one line on stderr, not a traceback."""
    return run_cli(main, argv, (data.DataError, CheckpointError, TrainingError))


if __name__ == "__main__":
    sys.exit(cli())
