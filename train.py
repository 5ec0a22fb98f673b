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

main() is the two stages, train() the loop. Each model gets a run folder under --out (teacher-224-*, mlcak-28-*,
baseline-28-*), named by every flag that changes its numbers, so a finished run is reused rather than trained again.
It holds best.pt (by validation mean local AUROC), last.pt (plain dicts of tensors and values, loadable with
torch.load(path, weights_only=True)) and log.csv. The run machinery (run folders, optimizer and schedule, resume,
DDP, locks, the log) is in machinery/runs.py, the per-image cache of a stage in machinery/cache.py.
"""

import argparse
import functools
import os
import sys
import time

import torch

import data
from evaluate import evaluate_checkpoints, predict, summary
from machinery.attention_maps import pick_rows, write_figures
from machinery.cache import StageCache
from machinery.pretrained import CHECKPOINT_NORMS, load_pretrained
from machinery.runs import Clock, Ddp, Run, RunFolders, short_hash, stage_seed
from machinery.runtime import (CheckpointError, Parser, TrainingError, add_shared_flags, atomic_open, label_mismatch,
                               load_checkpoint, pick_device, run_cli, writable)
from machinery.tables import format_table, markdown_table
from mlcak import joint_loss, model_input, targets_from_teacher
from vit import VARIANTS, VisionTransformer, ViTConfig


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
            with folders.claim(role, res, run_dir, ddp) as to_train:
                if to_train:
                    start, model = time.time(), initial_model(cfg, args, ddp, role)
                    images, _ = train(role, res, run_dir, model, teacher, train_set, val_set, args, ddp, info)
                    clock.add(f"{role}@{res}", time.time() - start, images)

        # Stage 1: the teacher sees the image at --img-size and learns from the labels alone (L_cls)
        teacher = None
        if "mlcak" in methods(args) or args.teacher_only:
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
    One model trained into run_dir on the paper's step; teacher is the frozen teacher for mlcak, None for the
    teacher itself and the baseline. Returns the number of images trained on and the loop's images per second.
    """
    kd = teacher is not None
    need_attn = kd and args.gamma != 0
    autocast = functools.partial(torch.autocast, ddp.device.type, dtype=torch.bfloat16, enabled=args.amp)

    def student_input(hr):  # the HR batch (B, 1, S, S) at the student's resolution: x = norm(up(down(x_HR)))
        return model_input(hr, res, data.NORM)

    def teacher_targets(hr):  # the frozen teacher on the HR batch: p_local^T, p_global^T, MLCAK^T
        with autocast():
            return targets_from_teacher(teacher(model_input(hr, args.img_size, data.NORM), return_attn=need_attn))

    # Both depend on the image alone (no augmentation, a frozen teacher): the cache computes them once per image
    cache = StageCache(train_set, [student_input, teacher_targets] if kd else [student_input], args.batch_size,
                       stage_seed(args.seed, role), args.workers, ddp)
    if cache.steps == 0:
        raise TrainingError(f"--batch-size {args.batch_size} is more than the {len(train_set)} training images: "
                            "not one step would run; lower --batch-size")
    saved = dict(args=vars(args), role=role, res=res, kd=kd, norm=list(data.NORM), label_names=train_set.label_names, data=info)
    run = Run(role, res, run_dir, model, cache.steps, args, ddp, saved)  # AdamW, schedule, resume, DDP, log, checkpoints
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    for epoch in run.epochs():
        model.train()
        for hr, labels, index in cache.batches(epoch):
            x = cache.get(student_input, hr, index)
            targets = cache.get(teacher_targets, hr, index) if kd else None  # None: L_cls alone
            with autocast():
                l_joint, terms = joint_loss(model(x, return_attn=need_attn), labels, targets, args.alpha, args.beta, args.gamma)
            optimizer.zero_grad(set_to_none=True)
            l_joint.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            run.after_step(epoch, terms)  # progress lines; a non-finite loss stops the run
        val = None
        if len(val_set):  # each process predicts its share of the validation images
            val = summary(ddp.sharded(lambda part: predict(run.raw, part, res, data.NORM, ddp.device), val_set),
                          val_set.label_names)
        run.end_epoch(epoch, val)  # log.csv, best.pt, last.pt
    return run.images()


def methods(args):
    """Which students this command trains."""
    if args.teacher_only:
        return []
    if args.compare:
        return ["baseline", "mlcak"]
    return ["baseline"] if args.no_kd else ["mlcak"]


def initial_model(cfg, args, ddp, role):
    """A fresh model of the stage, or one started from --init's timm/DeiT weights."""
    torch.manual_seed(stage_seed(args.seed, role))  # per stage: a student starts the same with or without a teacher
    model = VisionTransformer(cfg)
    if args.init:
        ddp.say(f"init: {args.init}: {load_pretrained(model, args.init, args.init_norm, data.NORM)}")
    return model.to(ddp.device)


def check_teacher(ckpt, path, cfg, label_names):
    """A teacher is a model trained as one, on the full-resolution image; it must predict the same labels and give
    MLCAK maps of the same size as the student's."""
    role, res, size = ckpt.get("role"), ckpt.get("res"), ckpt["vit_config"]["img_size"]
    if role != "teacher" or res != size:
        raise TrainingError(f"--teacher {path}: a {role} model that sees {res} px images, not a teacher (which sees "
                            f"--img-size {cfg.img_size}); give a teacher-{cfg.img_size}-*/best.pt")
    mismatch = label_mismatch(ckpt["label_names"], label_names, "this data")
    if mismatch:
        raise TrainingError(f"--teacher {path}: trained on other labels ({mismatch})")
    tokens = (size // ckpt["vit_config"]["patch_size"]) ** 2 + 1  # T, the class token included
    student_tokens = (cfg.img_size // cfg.patch_size) ** 2 + 1
    if size != cfg.img_size or tokens != student_tokens:
        raise TrainingError(f"--teacher {path}: sees {size} px in {tokens} tokens, the students {cfg.img_size} px in "
                            f"{student_tokens} tokens; the MLCAK maps must match")


def report(args, table, pairs, test_set, info, device):
    """The final AUROC table on the test set; with --compare also the Markdown table and attention maps."""
    results = evaluate_checkpoints(table, test_set, device, args.bootstrap, pairs, groups=data.label_groups(info["path"]))
    print(f"\ntest set: {len(test_set)} images ({info['path']})")
    print(format_table(results))
    if args.compare:
        name = os.path.join(args.out, f"table-{short_hash(table)}")
        with atomic_open(name + ".md") as f:
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
    add_shared_flags(p)  # --data, --cache-dir, --batch-size, --workers, --device, --amp
    p.add_argument("--model", default="vit_cpu", choices=sorted(VARIANTS), help="ViT variant for teacher and students")
    p.add_argument("--img-size", type=int, default=224, help="high resolution: the teacher's input side")
    p.add_argument("--epochs", type=int, default=30, help="epochs for each stage")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, linear warmup then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases, norms, embeddings)")
    p.add_argument("--warmup", type=float, default=0.1, help="share of the steps spent warming up")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of MSE on the local (MLCT) probabilities")
    p.add_argument("--beta", type=float, default=1.0, help="weight of MSE on the global (MCCT) probabilities")
    p.add_argument("--gamma", type=float, default=1000.0, help="weight of MSE on the MLCAK attention maps")
    p.add_argument("--no-kd", action="store_true", help="train the baseline student: L_cls only, no teacher")
    p.add_argument("--teacher-only", action="store_true", help="train (or reuse) the teacher alone, no student; with "
                   "--no-kd runs of this recipe, the models that do not depend on the method")
    p.add_argument("--compare", action="store_true", help="train baseline and mlcak students at every --res; write a Markdown table and attention maps")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals of the final table (0: none)")
    p.add_argument("--teacher", help="teacher checkpoint to distil from (default: train one, or reuse it from --out)")
    p.add_argument("--readers", default="majority", choices=["majority", "any"], help="how the readers of a VinDr image are combined")
    p.add_argument("--uncertain", default="zeros", choices=["zeros", "ones"], help="what an uncertain label (-1, as in CheXpert) counts as")
    p.add_argument("--views", default="frontal", choices=["frontal", "all"], help="CheXpert: frontal views only, or lateral ones too")
    p.add_argument("--boxes", help="boxes CSV for a CSV dataset (default: boxes.csv beside it, if there)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of training patients (or images) held out for validation, unless the data name their own")
    p.add_argument("--out", default="runs", help="folder of the run folders")
    p.add_argument("--rebuild-cache", action="store_true", help="decode every image again, although the cache's key (each "
                   "file's size, modification and change time) says it is unchanged")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="CUDA: full fp32 matrix products instead of TF32")
    p.add_argument("--init", help="start teacher and students from a timm/DeiT ViT checkpoint (state_dict, or a dict with 'model')")
    p.add_argument("--init-norm", default="imagenet", choices=sorted(CHECKPOINT_NORMS), help="input normalization the --init checkpoint was trained with")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs from their last.pt (model, optimizer, schedule, epoch)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained model and the frozen teacher")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization and data order (the teacher's: --seed + 1000)")
    return p


def parse_args(argv=None):
    """The flags, each checked before any work: a bad one is one line and exit code 2."""
    p = build_parser()
    args = p.parse_args(argv)
    for r in sorted({r for r in args.res if args.res.count(r) > 1}):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"--res {r} is given {args.res.count(r)} times: its models are trained and shown once")
    args.res = list(dict.fromkeys(args.res))  # in the order given, each once
    patch = ViTConfig(**VARIANTS[args.model]).patch_size
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
        (min(args.bootstrap, args.workers, args.seed) >= 0 and args.log_every >= 1,
         "--bootstrap, --workers and --seed must be 0 or more, --log-every at least 1"),
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
