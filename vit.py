"""
A plain Vision Transformer, written out by hand, whose attention matrices can be read and trained on.

This is the backbone of MLCAK (Akhter et al., "Low-Resolution Chest X-ray Classification via Knowledge
Distillation and Multi-task Learning", arXiv 2405.13370): the same class serves as the high-resolution teacher
and the low-resolution student. It follows ViT (Dosovitskiy et al., arXiv 2010.11929) and uses the parameter
names of timm's VisionTransformer, so ImageNet ViT/DeiT weights load with load_state_dict(strict=False) (for
train.py --init, machinery/pretrained.py moves their position embeddings to our grid and folds RGB to grey).

Dimensions: B batch, C input channels, T tokens (class token included), P = T - 1 patches, D width,
H heads, hd = D / H head width.

This file imports torch alone; copy it into your project as it is.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    img_size: int = 224        # input side in pixels (square); the student sees upsampled LR images of this size
    patch_size: int = 16       # side of one patch; the token grid is img_size / patch_size on each side
    in_chans: int = 1          # chest X-rays are grayscale
    embed_dim: int = 192       # D
    depth: int = 12            # number of transformer blocks
    num_heads: int = 3         # H
    mlp_ratio: float = 4.0     # MLP hidden width = mlp_ratio * D
    attn_drop: float = 0.0     # dropout on attention probabilities (after they are recorded)
    proj_drop: float = 0.0     # dropout after the attention projection and the MLP
    num_local: int = 22        # MLCT: one logit per local lesion label (VinDr-CXR has 22)
    num_global: int = 2        # MCCT: global classes (normal / abnormal)
    stem_chans: tuple = ()     # channels of a convolutional stem before the patch projection; () = plain ViT
    global_pool: str = "token" # what the heads read: "token" (the class token) or "max" (max over the patches)


# The paper's backbones (timm's vit_tiny/small/base_patch16_224, plain ViTs with class-token heads: timm's names
# and weights hold for these) and a small family for a 2-core CPU. vit_cpu adds two things a from-scratch ViT
# on a thousand images needs to see findings a few pixels wide (README, "Our reading"): a convolutional stem
# (Xiao et al., arXiv 2106.14881) and heads on the maximum over the patch tokens (a finding anywhere makes the
# image positive). Its pooling applies the final `norm` before the maximum, where timm's pooled ViTs apply an
# `fc_norm` after it: vit_cpu has no pretrained counterpart, and its names follow timm's only up to that norm.
# vit_cpu_wide and vit_cpu_deep differ from vit_cpu as the paper's variants differ from one another, in width (and
# heads, 32 wide each) or in depth, on the same 7 x 7 tokens and stem: the paper's third claim at CPU size.
VARIANTS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_cpu": dict(embed_dim=96, depth=4, num_heads=3, patch_size=32, stem_chans=(16, 32), global_pool="max"),
    "vit_cpu_wide": dict(embed_dim=192, depth=4, num_heads=6, patch_size=32, stem_chans=(16, 32), global_pool="max"),
    "vit_cpu_deep": dict(embed_dim=96, depth=8, num_heads=3, patch_size=32, stem_chans=(16, 32), global_pool="max"),
}


class PatchEmbed(nn.Module):
    """
    Cuts the image into non-overlapping patches and projects each to D dims (a strided convolution). With
    cfg.stem_chans, non-overlapping convolutions (4 x 4, then 2 x 2 each, GroupNorm, GELU) come first and proj
    covers the rest of the patch; the names follow timm's HybridEmbed (backbone, proj). Either way a token is
    made from its own patch_size x patch_size square; the stem's GroupNorm (one group) standardizes each feature
    map over the whole image, so the rest of the image enters only through those per-image statistics.
    """

    def __init__(self, cfg):
        super().__init__()
        self.grid_size = cfg.img_size // cfg.patch_size
        layers, chans, stride = [], cfg.in_chans, 1
        for i, width in enumerate(cfg.stem_chans):
            k = 4 if i == 0 else 2
            layers += [nn.Conv2d(chans, width, k, stride=k), nn.GroupNorm(1, width), nn.GELU()]
            chans, stride = width, stride * k
        assert cfg.patch_size % stride == 0, "the stem's stride must divide patch_size"
        self.backbone = nn.Sequential(*layers)  # empty (no parameters) for a plain ViT
        self.proj = nn.Conv2d(chans, cfg.embed_dim, kernel_size=cfg.patch_size // stride, stride=cfg.patch_size // stride)

    def forward(self, x):
        x = self.proj(self.backbone(x))      # (B, C, S, S) -> (B, c, S/s, S/s) -> (B, D, g, g)
        return x.flatten(2).transpose(1, 2)  # (B, D, P) -> (B, P, D), patches in row-major order


class Attention(nn.Module):
    """
    Multi-head self-attention. The explicit path computes softmax(q k^T / sqrt(hd)) itself so that the
    probabilities can be returned with their graph (MLCAK trains on them); the fused
    F.scaled_dot_product_attention path is faster but cannot return them, so it is used only when no one asks.
    """

    def __init__(self, cfg):
        super().__init__()
        assert cfg.embed_dim % cfg.num_heads == 0, "embed_dim must be divisible by num_heads"
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)  # rows ordered q | k | v
        self.attn_drop = nn.Dropout(cfg.attn_drop)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.proj_drop = nn.Dropout(cfg.proj_drop)

    def forward(self, x, return_attn=False):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # 3 x (B, H, T, hd)
        if return_attn:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, T, hd) @ (B, H, hd, T) -> (B, H, T, T)
            attn = attn.softmax(dim=-1)
            out = self.attn_drop(attn) @ v                 # (B, H, T, hd)
        else:
            attn = None
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, H, T, hd) -> (B, T, H, hd) -> (B, T, D)
        return self.proj_drop(self.proj(out)), attn


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.proj_drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x, return_attn=False):
        y, attn = self.attn(self.norm1(x), return_attn)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn


class VisionTransformer(nn.Module):
    """
    ViT with two heads on the final class token (or, with global_pool="max", on the maximum over the final patch
    tokens): head_local for MLCT (multi-label lesion logits) and head_global for MCCT (normal / abnormal logits).

    forward(x, return_attn) -> (local_logits (B, num_local), global_logits (B, num_global), attentions),
    where attentions is a list with one (B, H, T, T) tensor per block (softmax probabilities, before dropout,
    still in the autograd graph) when return_attn is True, and an empty list otherwise.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.img_size % cfg.patch_size == 0, "img_size must be a multiple of patch_size"
        assert cfg.global_pool in ("token", "max"), "global_pool must be 'token' or 'max'"
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        num_patches = self.patch_embed.grid_size ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, cfg.embed_dim))  # class slot first
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_local = nn.Linear(cfg.embed_dim, cfg.num_local)
        self.head_global = nn.Linear(cfg.embed_dim, cfg.num_global)
        self._init_weights()
        if cfg.stem_chans:  # channels-last weights make the stem run channels-last, where its few-channel
            self.patch_embed.to(memory_format=torch.channels_last)  # convolutions are several times faster on CPU

    def _init_weights(self):
        # timm's ViT initialisation: truncated normal 0.02 for embeddings and linear layers, zero biases
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)  # (D, C, p, p) seen as (D, C*p*p)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, x, return_attn=False):
        x = self.patch_embed(x)                              # (B, P, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)      # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed      # (B, T, D), T = 1 + P
        attentions = []
        for block in self.blocks:
            x, attn = block(x, return_attn)
            if return_attn:
                attentions.append(attn)
        x = pool_tokens(self.norm(x), self.cfg.global_pool)  # (B, T, D) -> (B, D)
        return self.head_local(x), self.head_global(x), attentions


def pool_tokens(x, global_pool):
    """(B, T, D) -> (B, D): the class token, or the maximum over the patch tokens (the class token left out)."""
    return x[:, 0] if global_pool == "token" else x[:, 1:].amax(dim=1)
