"""
Attention as explanation (the paper's Fig. 3): where a model looks, from its MLCAK map, scored against the finding
boxes and drawn over the image it saw.

    attention_maps(model, dataset, rows)    (n, g, g) maps over the patches, from mlcak.mlcak_map
    localization_score(model, ckpt, ds)     attention in box and the pointing game on the images that have boxes
    write_figures(folder, ds, loaded, rows) one PNG per image (the input, then each model's map), and overview.png

Figures are drawn with Pillow alone; the colour ramp is a few lines below.
"""

import collections
import hashlib
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from machinery.layouts import DataError
from machinery.runtime import atomic_open, run_name
from mlcak import mlcak_map, model_input, simulate_low_resolution


@torch.no_grad()
def attention_maps(model, dataset, rows, res, norm, device, batch_size=32):
    """
    Where the model looks, from MLCAK, for the given cache rows: the class token's row when the heads read the
    class token, else (max pooling over patches) the attention each patch receives from the patches, averaged.
    Returns (n, g, g) maps that sum to 1 over the patches.
    """
    model.eval()
    g, out = model.patch_embed.grid_size, []
    for start in range(0, len(rows), batch_size):
        images = torch.stack([dataset.image(int(n)) for n in rows[start:start + batch_size]]).to(device)
        _, _, attentions = model(model_input(images, res, norm), return_attn=True)
        mlcak = mlcak_map(attentions)          # (B, T, T)
        row = mlcak[:, 0, 1:] if model.cfg.global_pool == "token" else mlcak[:, 1:, 1:].mean(1)  # (B, P)
        out.append((row / row.sum(1, keepdim=True)).reshape(-1, g, g).float().cpu())  # (B, P) -> (B, g, g)
    return torch.cat(out) if out else torch.zeros(0, g, g)


def upsample(maps, size):
    """(n, g, g) patch maps -> (n, size, size) pixel maps (bilinear), each still summing to 1."""
    up = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]  # (n, S, S)
    return (up / up.sum((1, 2), keepdim=True)).numpy()


def box_mask(boxes, size):
    """Union of boxes (K, 5: label, x_min, y_min, x_max, y_max in pixels) as a (size, size) boolean mask."""
    mask = np.zeros((size, size), bool)
    for _, x0, y0, x1, y1 in boxes:
        mask[max(0, int(y0)):min(size, int(np.ceil(y1))), max(0, int(x0)):min(size, int(np.ceil(x1)))] = True
    return mask


def localization(maps, masks):
    """
    attention_in_box = mean over images of sum(map * mask): the share of attention inside the finding boxes.
    pointing_game    = mean over images of mask[argmax(map)]: the most attended pixel lies in a box.
    chance           = mean box area share: what a uniform map scores on both.
    Returns the means and, per image, in_box and hit.
    """
    if len(masks) == 0:
        return None
    masks = np.asarray(masks)
    flat = maps.reshape(len(maps), -1)
    hit = masks.reshape(len(masks), -1)[np.arange(len(maps)), flat.argmax(1)].astype(np.float64)
    in_box = (maps * masks).sum((1, 2))
    return dict(attention_in_box=float(in_box.mean()), pointing_game=float(hit.mean()), chance=float(masks.mean()),
                n_images=len(masks), in_box=in_box, hit=hit)


def localization_score(model, ckpt, dataset, device):
    """localization of a model's attention on the test images that have boxes; 'rows' are their positions."""
    positions = [i for i, n in enumerate(dataset.indices) if len(dataset.boxes(int(n)))]
    rows = [int(dataset.indices[i]) for i in positions]
    size = dataset.meta["size"]
    maps = upsample(attention_maps(model, dataset, rows, ckpt["res"], ckpt["norm"], device), size)
    result = localization(maps, [box_mask(dataset.boxes(n), size) for n in rows])
    return result and dict(result, rows=np.array(positions))


# a perceptually ordered dark-to-bright ramp (after matplotlib's inferno), interpolated linearly
RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                 [250, 193, 39], [252, 255, 164]], np.float64)


def colorize(values):
    """(H, W) in [0, 1] -> (H, W, 3) uint8 along RAMP."""
    x = np.clip(values, 0, 1) * (len(RAMP) - 1)
    i = np.minimum(x.astype(int), len(RAMP) - 2)
    f = (x - i)[..., None]
    return (RAMP[i] * (1 - f) + RAMP[i + 1] * f).astype(np.uint8)


def panel(image, boxes, title, heat=None, title_height=14):
    """One figure panel: the image (S, S) in [0, 1], the attention map overlaid, the boxes, a title above."""
    rgb = np.repeat((np.clip(image, 0, 1) * 255)[..., None], 3, axis=2)
    if heat is not None:
        rgb = 0.45 * rgb + 0.55 * colorize((heat - heat.min()) / max(heat.max() - heat.min(), 1e-12))  # per-map contrast
    S = image.shape[0]
    canvas = Image.new("RGB", (S, S + title_height), "white")
    canvas.paste(Image.fromarray(rgb.astype(np.uint8)), (0, title_height))
    draw = ImageDraw.Draw(canvas)
    for _, x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0 + title_height, x1, y1 + title_height], outline=(0, 255, 0))
    draw.text((2, 1), title, fill="black")
    return canvas


def write_figures(folder, dataset, loaded, rows, device, overview_rows=24):
    """One PNG per image (input, then each checkpoint's map), and overview.png stacking the first overview_rows.
    Returns the number of PNGs besides overview.png."""
    os.makedirs(folder, exist_ok=True)
    size = dataset.meta["size"]
    maps = [upsample(attention_maps(m, dataset, rows, c["res"], c["norm"], device), size) for m, c in loaded]
    figures, names = [], figure_names([dataset.image_ids[n] for n in rows])
    for k, n in enumerate(rows):
        hr, boxes = dataset.image(n), dataset.boxes(n)
        title = os.path.basename(dataset.image_ids[n]).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        panels = [panel(hr[0].numpy(), boxes, f"{title[:16]} @{size}")]
        for (model, ckpt), m in zip(loaded, maps):
            seen = simulate_low_resolution(hr[None], ckpt["res"])[0, 0].numpy()  # what this model saw, before normalization
            panels.append(panel(seen, boxes, run_name(ckpt), heat=m[k]))
        figure = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
        for j, p in enumerate(panels):
            figure.paste(p, (j * p.width, 0))
        with atomic_open(os.path.join(folder, names[k]), "wb") as f:  # never half a PNG, even on Ctrl-C
            figure.save(f, format="PNG")
        if k < overview_rows:
            figures.append(figure)
    overview = Image.new("RGB", (figures[0].width, sum(f.height for f in figures)), "white")
    for j, f in enumerate(figures):
        overview.paste(f, (0, j * f.height))
    with atomic_open(os.path.join(folder, "overview.png"), "wb") as f:
        overview.save(f, format="PNG")
    return len(rows)


def file_name(image_id):
    """An image id as a file name: ids may hold folders (test/NORMAL/x.jpeg -> test_NORMAL_x.jpeg)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)


def figure_names(image_ids):
    """A PNG name for each image id, one each: file_name(id).png, with a hash of the id where two ids would share a
    name (a,b.png and a_b.png) or one would be overview.png."""
    plain = [file_name(i) for i in image_ids]
    count = collections.Counter(plain)
    taken = {p for p in plain if count[p] > 1 or p == "overview"}
    return [f"{p}-{hashlib.sha1(i.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}.png" if p in taken else f"{p}.png"
            for p, i in zip(plain, image_ids)]


def pick_rows(dataset, ids=None, count=6):
    """Cache rows to draw: the given image ids, or else the test images with the most boxes."""
    if ids:
        known = {i: n for n, i in enumerate(dataset.image_ids)}
        missing = [i for i in ids if i not in known]
        if missing:
            raise DataError(f"--map-ids: image {missing[0]} is not in the test set")
        return [known[i] for i in ids]
    return sorted((int(n) for n in dataset.indices), key=lambda n: (-len(dataset.boxes(n)), n))[:count]
