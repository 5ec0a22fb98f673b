"""
Speed of the hand-written ViT and of an MLCAK step, measured in one process on one machine.

    python -m machinery.bench                          # CPU: vit_cpu and vit_tiny at 224
    python -m machinery.bench --device cuda --amp --batch-size 128

Prints images per second for: our ViT's training step (forward, loss, backward, clipping, AdamW, as train.py takes
it) on the explicit-attention and the fused path, and inference, against a reference ViT of the same size built from
PyTorch's nn.TransformerEncoderLayer; the mlcak student's step with the teacher's targets looked up (as train.py
does) and with the teacher run at every step; the student's input; the cached data loader. These isolated steps
are what train.py's progress lines are measured against, and for vit_cpu train.py's own loop runs here too, for
three epochs of each stage on the default data (or --data), so the two compare in one process. It also prints the
achieved GFLOP/s of the training step next to this machine's matrix-multiply peak, measured here too.
"""

import argparse
import contextlib
import functools
import io
import math
import os
import tempfile
import time

import torch
import torch.nn as nn

import data
import train
from machinery import layouts, runs, synthetic
from machinery.runtime import Parser, add_shared_flags, pick_device
from mlcak import joint_loss, model_input, targets_from_teacher
from vit import VARIANTS, PatchEmbed, VisionTransformer, ViTConfig, pool_tokens


class ReferenceViT(nn.Module):
    """
    The same ViT with PyTorch's own blocks (pre-norm TransformerEncoderLayer, GELU): the speed to match. The patch
    embedding (and any convolutional stem) is ours in both, so the comparison is about the transformer.
    """

    def __init__(self, cfg):
        super().__init__()
        D, self.pool = cfg.embed_dim, cfg.global_pool
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (cfg.img_size // cfg.patch_size) ** 2, D))
        layer = nn.TransformerEncoderLayer(D, cfg.num_heads, int(D * cfg.mlp_ratio), dropout=0.0, activation="gelu",
                                           layer_norm_eps=1e-6, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head_local, self.head_global = nn.Linear(D, cfg.num_local), nn.Linear(D, cfg.num_global)

    def forward(self, x, return_attn=False):
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed  # (B, T, D)
        x = pool_tokens(self.norm(self.blocks(x)), self.pool)  # (B, T, D) -> (B, D)
        return self.head_local(x), self.head_global(x), []


def train_flops_per_image(cfg):
    """Multiply-adds x 2 of one forward, x 3 for forward and backward (the usual estimate)."""
    T, D, g = 1 + (cfg.img_size // cfg.patch_size) ** 2, cfg.embed_dim, cfg.img_size // cfg.patch_size
    hidden = int(D * cfg.mlp_ratio)
    per_block = T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * hidden
    side, chans, embed = cfg.img_size, cfg.in_chans, 0
    for i, width in enumerate(cfg.stem_chans):  # the convolutional stem, if any: 4 x 4 then 2 x 2 kernels
        k = 4 if i == 0 else 2
        side //= k
        embed += side * side * width * chans * k * k
        chans = width
    embed += g * g * D * chans * (side // g) ** 2  # the patch projection
    forward = embed + cfg.depth * per_block
    return 3 * 2 * forward


def timed(fn, seconds, device, rounds=3):
    """
    Seconds per call: two warm-up calls, then the best of `rounds` rounds of about `seconds` each (other work on
    the machine only ever slows a round down).
    """
    def run(calls):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls

    run(1)
    calls = max(2, math.ceil(seconds / run(1)))
    return min(run(calls) for _ in range(rounds))


def matmul_peak(device, n=2048, dtype=torch.float32):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, 0.5, device)
    return 2 * n ** 3 / seconds / 1e9


def bench_variant(name, args, device):
    cfg = ViTConfig(**VARIANTS[name])
    B, rows = args.batch_size, {}
    x = torch.randn(B, 1, cfg.img_size, cfg.img_size, device=device)
    targets = (torch.randint(0, 2, (B, cfg.num_local), device=device).float(), torch.randint(0, 2, (B,), device=device))
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.amp)

    def train_step(model, opt, return_attn, teacher=None, table=None):
        """A step as train.py takes it: forward, loss, backward, gradient clipping, AdamW update. For mlcak, the
        teacher's targets are looked up (table) or the teacher is run on the batch (teacher)."""
        def step():
            with autocast():
                teacher_targets = table
                if teacher is not None:
                    with torch.no_grad():
                        teacher_targets = targets_from_teacher(teacher(x, return_attn=True))
                loss, _ = joint_loss(model(x, return_attn=return_attn), targets, teacher_targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return step

    def infer(model, return_attn):
        def step():
            with torch.no_grad(), autocast():
                model(x, return_attn=return_attn)
        return step

    ours, reference = VisionTransformer(cfg).to(device), ReferenceViT(cfg).to(device)
    teacher = VisionTransformer(cfg).to(device).eval()
    with torch.no_grad(), autocast():
        table = targets_from_teacher(teacher(x, return_attn=True))
    opt_ours, opt_ref = torch.optim.AdamW(ours.parameters()), torch.optim.AdamW(reference.parameters())

    def rate(fn):  # images per second
        return B / timed(fn, args.seconds, device)

    rows["train, ours explicit attention"] = rate(train_step(ours, opt_ours, True))
    rows["train, ours fused attention (teacher, baseline)"] = rate(train_step(ours, opt_ours, False))
    rows["train, reference (nn.TransformerEncoderLayer)"] = rate(train_step(reference, opt_ref, False))
    ours.eval()
    reference.eval()
    rows["inference, ours fused"] = rate(infer(ours, False))
    rows["inference, ours explicit (attention returned)"] = rate(infer(ours, True))
    rows["inference, reference"] = rate(infer(reference, False))
    ours.train()
    rows["mlcak step, teacher targets looked up (train.py)"] = rate(train_step(ours, opt_ours, True, table=table))
    rows["mlcak step, teacher run at each step"] = rate(train_step(ours, opt_ours, True, teacher=teacher))
    rows["student input (mlcak.model_input at 28)"] = rate(lambda: model_input(x, 28, (0.5, 0.25)))
    return cfg, rows


def bench_loader(args, device):
    """Images per second out of the cached dataset through a DataLoader (--data, or the default data, as train.py
    reads it)."""
    root = args.data or synthetic.make_synthetic(os.path.join(data.DEFAULT_DATA, "synthetic"), verbose=False)
    dataset = data.XrayDataset(data.build_cache(layouts.load_source(root, "train"), 224, args.cache_dir, verbose=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    start, count = time.perf_counter(), 0
    for _ in range(2):
        for images, *_ in loader:
            images.to(device, non_blocking=True)
            count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def bench_loop(args, device, epochs=3):
    """
    train.py's own loop (train.train: batches, steps, validation and checkpoints each epoch) for a few epochs of the
    teacher and of the mlcak student on --data (default: the synthetic default data), in images per second as its
    progress lines count them: in the same process as the isolated steps, so the two can be compared on a machine
    whose speed drifts.
    """
    out = tempfile.TemporaryDirectory(prefix="mlcak-bench-")  # the loop's checkpoints, removed afterwards
    argv = ["--epochs", str(epochs), "--batch-size", str(args.batch_size), "--out", out.name, "--device", args.device,
            "--log-every", "1000000"] + (["--amp"] if args.amp else [])
    argv += (["--data", args.data] if args.data else []) + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    targs = train.parse_args(argv)
    ddp = runs.Ddp(device, True)
    with out, contextlib.redirect_stdout(io.StringIO()):  # the data's and the loop's own progress lines
        train_set, val_set, _, info = data.load_splits(targs, runs.Clock())
        cfg = ViTConfig(num_local=len(train_set.label_names), **VARIANTS["vit_cpu"])
        teacher = VisionTransformer(cfg).to(device).eval().requires_grad_(False)
        rates = {}
        for role, res, frozen in (("teacher", cfg.img_size, None), ("mlcak", 28, teacher)):
            model = train.initial_model(cfg, targs, ddp, role)
            _, rates[role] = train.train(role, res, os.path.join(out.name, role), model, frozen, train_set, val_set, targs,
                                         ddp, info)
    return rates


def main(argv=None):
    p = Parser(prog="python -m machinery.bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="Benchmark our ViT and the MLCAK step; --data is what the loader and train.py's loop read.")
    add_shared_flags(p)
    p.add_argument("--variants", nargs="+", default=["vit_cpu", "vit_tiny"], choices=sorted(VARIANTS), help="ViT variants to measure")
    p.add_argument("--seconds", type=float, default=1.0, help="length of a timed round (after 2 warm-up calls; the best of 3 rounds)")
    p.add_argument("--no-loop", dest="loop", action="store_false", help="skip train.py's loop on the data (run by default, for vit_cpu)")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as err:
        p.error(str(err))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.amp else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak(device, dtype=dtype)
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {'bf16 autocast' if args.amp else 'fp32'}")
    print(f"matmul peak (2048^3, {str(dtype)[6:]}): {peak:.0f} GFLOP/s")
    loader = bench_loader(args, device)
    for variant in args.variants:
        cfg, rows = bench_variant(variant, args, device)
        stem = f", stem {'-'.join(map(str, cfg.stem_chans))}" if cfg.stem_chans else ""
        print(f"\n{variant} ({cfg.embed_dim} wide, {cfg.depth} layers, patch {cfg.patch_size}{stem}, {cfg.img_size} px, "
              f"{cfg.global_pool} pooling)")
        for label, value in rows.items():
            print(f"  {label:<50} {value:>8.1f} img/s")
        ref_train, ref_infer = rows["train, reference (nn.TransformerEncoderLayer)"], rows["inference, reference"]
        fused, mlcak = rows["train, ours fused attention (teacher, baseline)"], rows["mlcak step, teacher targets looked up (train.py)"]
        print(f"  ratio explicit-attention train / reference train   {rows['train, ours explicit attention'] / ref_train:.2f}")
        print(f"  ratio fused train / reference train                {fused / ref_train:.2f}")
        print(f"  ratio fused inference / reference inference        {rows['inference, ours fused'] / ref_infer:.2f}")
        print(f"  ratio mlcak step / fused step                      {mlcak / fused:.2f}")
        print(f"  ratio teacher looked up / teacher run each step    {mlcak / rows['mlcak step, teacher run at each step']:.2f}")
        print(f"  ratio data loader / fused train step               {loader / fused:.1f} (loader {loader:.0f} img/s)")
        print(f"  train.py's progress lines should reach 90% of these: teacher and baseline {0.9 * fused:.0f} img/s, "
              f"mlcak {0.9 * mlcak:.0f} img/s")
        if variant == "vit_cpu" and args.loop:
            loop = bench_loop(args, device)
            print(f"  train.py's loop, 3 epochs on {args.data or 'the default data'}: teacher {loop['teacher']:.0f} img/s "
                  f"({loop['teacher'] / fused:.0%} of the fused step), mlcak {loop['mlcak']:.0f} img/s "
                  f"({loop['mlcak'] / mlcak:.0%} of the mlcak step)")
        achieved = train_flops_per_image(cfg) * fused / 1e9
        print(f"  train step: {achieved:.0f} GFLOP/s = {achieved / peak:.0%} of the matmul peak")


if __name__ == "__main__":
    main()
