"""
Trains MLCAK (arXiv 2405.13370) in the paper's two stages and prints AUROC on the test set.

    Stage 1  the teacher: a ViT at high resolution (--img-size, 224) on L_cls alone
    Stage 2  each student: the same ViT at low resolution (--res), either
             mlcak     L_joint = L_KD + L_cls against the frozen teacher, or
             baseline  L_cls alone (--no-kd)
    Report   AUROC of every model on the test set, with bootstrap intervals (evaluate.py)

    python train.py --res 28                 # synthetic VinDr-style data (made on first use), CPU, a few minutes
    python train.py --res 28 --no-kd         # the baseline: the same recipe with L_cls only
    python train.py --res 112 56 28 --compare   # baseline and mlcak at each resolution: the paper's table
    python train.py --data /data/vindr-cxr --model vit_small --device cuda --epochs 30 --batch-size 128 --res 28
    torchrun --standalone --nproc_per_node=4 train.py --data /data/vindr-cxr --model vit_small --device cuda --amp

Each model gets a run folder under --out (teacher-224-*, mlcak-28-*, baseline-28-*), named by every flag that
changes its numbers, so a finished run is reused rather than trained again (runs.RunFolders). It holds best.pt
(by validation mean local AUROC) and last.pt: plain dicts of tensors and values, loadable with
torch.load(path, weights_only=True). The loop is train() below; the machinery is in runs.py (run folders, log.csv,
torchrun) and runtime.py (checkpoints, the command line), the data and each stage's batches in data.py, the flags at
the end of this file.
"""

import argparse
import functools
import math
import os
import sys
import time

import torch

import data
from evaluate import evaluate_checkpoints, format_table, label_groups, markdown_table, summary
from maps import pick_rows, write_figures
from mlcak import joint_loss
from predict import predict
from runs import Clock, Ddp, EpochLog, RunFolders, finished, short_hash
from runtime import (CheckpointError, Lock, Parser, first_line, load_checkpoint, load_weights, pick_device, read_checkpoint,
                     run_cli, save_checkpoint, writable)
from vit import CHECKPOINT_NORMS, VARIANTS, ViTConfig, VisionTransformer, adapt_timm_state_dict


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss, a teacher that does not fit); the message is one line."""


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights everywhere
    ddp, clock = Ddp(pick_device(args.device), args.tf32), Clock()
    try:
        # the data and their caches before the process group starts: no collective waits on a long build
        train_set, val_set, test_set, info = ddp.prepare(lambda create: data.load_splits(args, clock, create, ddp.master))
        ddp.start(args.out)
        cfg = ViTConfig(img_size=args.img_size, num_local=len(train_set.label_names), **VARIANTS[args.model])
        folders = RunFolders(args, info, ddp.device)

        def fit(role, res, run_dir, teacher=None):  # train one model, unless a finished run of these flags is there
            with Lock(os.path.join(run_dir, ".lock"), f"the run {run_dir}", enabled=ddp.master):
                if finished(run_dir, args.epochs):
                    ddp.say(f"{role}@{res}: reusing {run_dir}")
                    return
                if args.resume and not os.path.isfile(os.path.join(run_dir, "last.pt")):
                    others = "; ".join(folders.interrupted(role, res, run_dir)) or "none"
                    ddp.say(f"{role}@{res}: --resume: no interrupted run of these settings ({run_dir}), so it starts "
                            f"from the beginning; interrupted runs of this data under other settings: {others}")
                start, model = time.time(), initial_model(cfg, args, ddp)
                images, _ = train(role, res, run_dir, model, teacher, train_set, val_set, args, ddp, info)
                clock.add(f"{role}@{res}", time.time() - start, images)

        # Stage 1: the teacher sees the image at --img-size and learns from the labels alone (L_cls)
        teacher = None
        if "mlcak" in methods(args):
            if args.teacher:
                ddp.say(f"teacher: {args.teacher}")
            else:
                fit("teacher", args.img_size, folders.teacher)
            teacher, ckpt = load_checkpoint(folders.teacher_checkpoint, ddp.device)  # eval mode, never wrapped in DDP
            check_teacher(ckpt, folders.teacher_checkpoint, cfg, train_set.label_names)
            teacher.requires_grad_(False)
            if args.compile:
                teacher = torch.compile(teacher)

        # Stage 2: each student sees the image at --res; mlcak also learns from the frozen teacher (L_joint)
        table, pairs = [], []
        if os.path.isfile(folders.teacher_checkpoint):
            table.append(folders.teacher_checkpoint)
        for res in args.res:
            column = {}
            for method in ("baseline", "mlcak"):
                run_dir = folders.student(method, res)
                if method in methods(args):
                    fit(method, res, run_dir, teacher if method == "mlcak" else None)
                if os.path.isfile(os.path.join(run_dir, "best.pt")):  # trained now, or earlier: shown side by side
                    column[method] = len(table)
                    table.append(os.path.join(run_dir, "best.pt"))
            if len(column) == 2:
                pairs.append((column["baseline"], column["mlcak"]))  # mlcak - baseline at this resolution, paired

        # The report: every model on the test set
        if ddp.master:
            start = time.time()
            report(args, table, pairs, test_set, info, ddp.device)
            clock.add("evaluation", time.time() - start)
            print(clock.line())
    finally:
        ddp.stop()


def train(role, res, run_dir, model, teacher, train_set, val_set, args, ddp, info):
    """
    One model trained into run_dir: AdamW, warmup + cosine, validation each epoch, best.pt, last.pt and log.csv.
    teacher is the frozen teacher for mlcak, None for the teacher itself and the baseline. Returns the number of
    images trained on and the loop's images per second (validation and checkpoints included).
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
    stage = data.StageData(train_set, res, teacher, need_attn, autocast, args, ddp)
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
        ddp.say(f"{role}: resuming {last_path} after epoch {first_epoch}")
    if args.compile:
        model = torch.compile(model)
    if ddp.on:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.say(f"{role}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, res {res}, {total} steps, "
            f"{'L_KD + L_cls' if kd else 'L_cls'}, run folder {run_dir}")
    saved = dict(args=vars(args), role=role, res=res, kd=kd, norm=list(data.NORM), label_names=train_set.label_names, data=info)
    log = EpochLog(run_dir, after_epoch=first_epoch)
    start, start_step = time.time(), step
    for epoch in range(first_epoch, args.epochs):
        model.train()
        epoch_start, sums = time.time(), {}
        for x, labels, teacher_targets in stage.batches(epoch):
            # looked up in the stage's table, computed once per image (data.StageData), they stand for:
            #   x = mlcak.model_input(images, res, data.NORM)                           the student's input at --res
            #   teacher_targets = mlcak.targets_from_teacher(teacher(mlcak.model_input(images, args.img_size, data.NORM),
            #                                                        return_attn=True))    None for teacher, baseline
            with autocast():
                l_joint, terms = joint_loss(model(x, return_attn=need_attn), labels, teacher_targets,
                                            args.alpha, args.beta, args.gamma)  # L_KD + L_cls, or L_cls alone
            opt.zero_grad(set_to_none=True)
            l_joint.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = sched.get_last_lr()[0]  # this step's
            opt.step()
            sched.step()
            step += 1
            sums = {k: sums.get(k, 0) + v for k, v in terms.items()}  # for log.csv's means over the epoch
            if not torch.isfinite(l_joint):  # a host sync, but a NaN run must stop at once, not train on to the end
                parts = " ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                raise TrainingError(f"{role}: the loss is not finite at step {step} ({parts}); nothing of this step "
                                    "was saved; try a lower --lr")
            if ddp.master and (step % args.log_every == 0 or step == total):
                rate = (step - start_step) * args.batch_size / (time.time() - start)
                parts = " ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                print(f"{role} epoch {epoch + 1}/{args.epochs} step {step}/{total} | {parts} | "
                      f"{rate:.0f} img/s, ETA {(total - step) * args.batch_size / rate:.0f}s", flush=True)
        val = None
        if len(val_set):  # each process predicts its share of the validation images
            val = summary(ddp.sharded(lambda part: predict(raw, part, res, data.NORM, device), val_set), val_set.label_names)
        score = val["mean_local_auroc"] if val else float("nan")
        metrics = dict(epoch=epoch + 1, val_mean_local_auroc=score,
                       val_normal_abnormal_auroc=val["normal_abnormal_auroc"] if val else None)
        if ddp.master:
            if val:
                print(f"{role} epoch {epoch + 1}: val mean local AUROC {score:.3f} ({val['labels_defined']} labels), "
                      f"normal/abnormal {val['normal_abnormal_auroc']:.3f}")
            seconds = time.time() - epoch_start
            log.add(epoch=epoch + 1, step=step, lr=f"{lr:.6g}", **{k: f"{float(v) / stage.steps:.6g}" for k, v in sums.items()},
                    val_mean_local_auroc=score, val_normal_abnormal_auroc=metrics["val_normal_abnormal_auroc"],
                    seconds=f"{seconds:.2f}", images_per_second=f"{stage.steps * args.batch_size / seconds:.1f}")
            if math.isnan(score) or score > best:  # no validation score: best = last
                best = score if not math.isnan(score) else best
                save_checkpoint(os.path.join(run_dir, "best.pt"), raw, epoch=epoch + 1, step=step, metrics=metrics, **saved)
            save_checkpoint(last_path, raw, epoch=epoch + 1, step=step, metrics=metrics, best=best, optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), rng=torch.get_rng_state(), **saved)
        ddp.barrier()
    images = (step - start_step) * args.batch_size
    return images, images / (time.time() - start)  # and the rate its progress lines give (bench.py compares it)


def methods(args):
    """Which students this command trains."""
    if args.compare:
        return ["baseline", "mlcak"]
    if args.no_kd:
        return ["baseline"]
    return ["mlcak"]


def initial_model(cfg, args, ddp):
    """A fresh model of the stage, or one started from --init's timm/DeiT weights."""
    torch.manual_seed(args.seed)  # per stage: a student starts the same whether or not a teacher trained before it
    model = VisionTransformer(cfg)
    if args.init:
        state = load_weights(args.init)
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TrainingError(f"--init {args.init}: not a state_dict (a dict of tensors, or a dict with one under 'model')")
        try:
            state, report = adapt_timm_state_dict(state, model, args.init_norm, data.NORM)
            model.load_state_dict(state, strict=False)
        except Exception as err:  # not a ViT of this width; whatever else, one line and never a traceback
            raise TrainingError(f"--init {args.init}: {err if isinstance(err, ValueError) else first_line(err)}") from None
        ddp.say(f"init: {args.init}: {len(report['loaded'])} tensors loaded, converted {report['converted']}, "
                f"dropped {report['dropped']}, heads new")
    return model.to(ddp.device)


def lr_factor(step, total, warmup):
    """The learning rate, as a share of --lr, at a step: linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


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
    tokens = (size // ckpt["vit_config"]["patch_size"]) ** 2 + 1  # T, the class token included
    student_tokens = (cfg.img_size // cfg.patch_size) ** 2 + 1
    if size != cfg.img_size or tokens != student_tokens:
        raise TrainingError(f"--teacher {path}: sees {size} px in {tokens} tokens, the students {cfg.img_size} px in "
                            f"{student_tokens} tokens; the MLCAK maps must match")


def report(args, table, pairs, test_set, info, device):
    """The final AUROC table on the test set; with --compare also the Markdown table and attention maps."""
    results = evaluate_checkpoints(table, test_set, device, args.bootstrap, pairs, groups=label_groups(info["path"]))
    print(f"\ntest set: {len(test_set)} images ({info['path']})")
    print(format_table(results))
    if args.compare:
        name = os.path.join(args.out, f"table-{short_hash(table)}")
        with open(name + ".md", "w") as f:
            intervals = f"intervals from {args.bootstrap} bootstrap resamples of the test images" if args.bootstrap else \
                "no intervals (--bootstrap 0)"
            f.write(f"Test set: {len(test_set)} images of {info['path']}; {intervals}.\n\n{markdown_table(results)}\n")
        loaded = [load_checkpoint(p, device) for p in table]
        write_figures(name + "-maps", test_set, loaded, pick_rows(test_set), device)
        print(f"wrote {name}.md and attention maps in {name}-maps/")


# -------------------------------------------------------------------------------------------------- command line

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
    """The flags, each checked before any work: a bad one is one line and exit code 2."""
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
