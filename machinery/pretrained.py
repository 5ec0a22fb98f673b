"""
Starting our ViT from pretrained timm or DeiT weights (train.py --init): their names are ours (vit.py follows
timm's), so what is left is moving the position embeddings to our token grid and folding the RGB patch
projection to one grey channel. Nothing is ever downloaded: --init names a file.

    load_pretrained(model, path)                     --init: a timm/DeiT checkpoint file into one of our models
    adapt_timm_state_dict(state_dict, model)         a timm/DeiT state_dict for one of our grey-input models
    resample_pos_embed(pos_embed, new_grid)          bicubic, antialiased, to an explicit grid size
"""

import math

import torch
import torch.nn.functional as F

from machinery.runtime import CheckpointError, first_line, load_weights


def resample_pos_embed(pos_embed, new_grid, old_grid=None, num_prefix_tokens=1):
    """
    Moves position embeddings (1, prefix + h*w, D) to a new (h', w') patch grid by bicubic, antialiased
    interpolation to an explicit size (never slicing, never a scale factor); prefix (class) slots are kept.
    """
    if isinstance(new_grid, int):
        new_grid = (new_grid, new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        side = int(math.isqrt(grid.shape[1]))
        if side * side != grid.shape[1]:
            raise ValueError(f"pos_embed holds {grid.shape[1]} patch positions after {num_prefix_tokens} prefix "
                             "slot(s): not a square grid (give old_grid)")
        old_grid = (side, side)
    old_grid = tuple(old_grid)
    if old_grid == tuple(new_grid):
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, h*w, D) -> (1, D, h, w)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)  # (1, D, h', w') -> (1, h'*w', D)
    return torch.cat([prefix, grid], dim=1)


# the input normalizations that timm / DeiT checkpoints were trained with, per RGB channel: (mean, std)
CHECKPOINT_NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DeiT, most timm ViTs
                    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}                # timm's augreg ViTs


def adapt_timm_state_dict(state_dict, model, checkpoint_norm="imagenet", input_norm=(0.5, 0.25)):
    """
    Converts a timm/DeiT ViT state_dict for `model` (grayscale input normalized as (g - mu) / sigma):

        the checkpoint saw, per channel c, (g - m_c) / s_c for a gray pixel g shown as (g, g, g), so
        W' = sigma * sum_c W_c / s_c      b' = b + sum_{c, pixels} W_c * (mu - m_c) / s_c

    gives the same patch embedding as the pretrained model on the replicated gray image, normalization included.
    pos_embed is resampled to the model's grid; classifier heads are dropped. A distilled DeiT (dist_token,
    head_dist, pos_embed with two prefix slots) loads too: its distillation token and that token's position slot
    are dropped. Returns (state_dict, report) with the keys 'loaded', 'converted', 'dropped'; raises ValueError
    if the checkpoint is not a ViT of this width.
    """
    own = model.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed"):
        if key not in state_dict:
            raise ValueError(f"not a timm/DeiT ViT state_dict: no '{key}'")
    out, report = {}, {"loaded": [], "converted": [], "dropped": []}
    for key, value in state_dict.items():
        if key not in own:
            report["dropped"].append(key)
            continue
        if key == "patch_embed.proj.weight" and own[key].shape[1] == 1:
            mean, std = (torch.tensor(v, dtype=value.dtype)[: value.shape[1], None, None] for v in CHECKPOINT_NORMS[checkpoint_norm])
            mu, sigma = input_norm
            out["patch_embed.proj.bias"] = state_dict["patch_embed.proj.bias"] + (value * (mu - mean) / std).sum((1, 2, 3))
            value = sigma * (value / std).sum(dim=1, keepdim=True)  # (D, C, p, p) -> (D, 1, p, p)
            report["converted"] += [key, "patch_embed.proj.bias"]
        elif key == "patch_embed.proj.bias" and own["patch_embed.proj.weight"].shape[1] == 1:
            continue  # folded together with the weight above
        elif key == "pos_embed" and value.shape != own[key].shape:
            if "dist_token" in state_dict:  # DeiT's slots: class, distillation, then the patches; ours: class, patches
                value = torch.cat([value[:, :1], value[:, 2:]], dim=1)  # (1, 2 + P, D) -> (1, 1 + P, D)
                report["dropped"].append("pos_embed[:, 1] (the distillation token's slot)")
            value = resample_pos_embed(value, model.patch_embed.grid_size)
            report["converted"].append(key)
        if value.shape != own[key].shape:
            raise ValueError(f"checkpoint does not fit this model: {key} is {tuple(value.shape)}, "
                             f"the model has {tuple(own[key].shape)} (another ViT width or depth, or a convolutional stem?)")
        out[key] = value
        if key not in report["converted"]:
            report["loaded"].append(key)
    return out, report


def load_pretrained(model, path, checkpoint_norm="imagenet", input_norm=(0.5, 0.25)):
    """
    --init: the timm/DeiT state_dict in the file at path (or the one under its 'model') loaded into model, converted
    by adapt_timm_state_dict; the heads stay new. Returns a one-line report; a file that is not such a checkpoint, or
    one that does not fit the model, is a CheckpointError of one line.
    """
    state = load_weights(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--init {path}: not a state_dict (a dict of tensors, or a dict with one under 'model')")
    try:
        state, report = adapt_timm_state_dict(state, model, checkpoint_norm, input_norm)
        model.load_state_dict(state, strict=False)
    except Exception as err:  # not a ViT of this width; whatever else, one line and never a traceback
        raise CheckpointError(f"--init {path}: {err if isinstance(err, ValueError) else first_line(err)}") from None
    return (f"{len(report['loaded'])} tensors loaded, converted {report['converted']}, dropped {report['dropped']}, "
            "heads new")
