"""
Evaluates MLCAK checkpoints on a test set: AUROC per local label (MLCT) with its numbers of positives and
negatives, their mean over the labels where AUROC is defined, and normal/abnormal AUROC (MCCT).

    python evaluate.py runs/teacher-224-*/best.pt runs/mlcak-28-*/best.pt
    python evaluate.py CKPT --data /data/vindr-cxr      # another dataset than the one the checkpoint names
    python evaluate.py CKPT... --maps figures/          # attention maps over the images (the paper's Fig. 3)
    python evaluate.py runs/*/best.pt --seeds           # runs of several seeds: tables over seeds, pooled tests

A student checkpoint is evaluated at its own resolution (the HR test image, reduced by
mlcak.simulate_low_resolution). Each checkpoint gets a JSON file beside it (best.pt -> best.eval.json).
"""

import argparse
import json
import math
import os
import re
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import layouts
from mlcak import mlcak_map, model_input, simulate_low_resolution
from runtime import CheckpointError, Parser, load_checkpoint, pick_device, writable


def auroc_rows(y_true, y_score, weights=None):
    """
    AUROC = P(score of a random positive > score of a random negative), ties counting 1/2, for one score vector
    and each row of weights (R, N): how many times each image counts (bootstrap resamples; once by default).
    With the scores sorted into groups g of equal value, W+_g and W-_g the weights of positives and negatives:

        AUROC = sum_g W+_g * (W-_{below g} + W-_g / 2) / (W+ * W-)

    One sort serves every resample. NaN for a row with one class only (never 0 or 0.5, which would bias a mean).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, np.float64).ravel()
    w = np.ones((1, len(s))) if weights is None else np.asarray(weights, np.float64)
    order = np.argsort(s, kind="stable")
    groups = np.r_[0, np.flatnonzero(np.diff(s[order])) + 1]  # where each run of tied scores starts
    pos = np.add.reduceat(w[:, order] * y[order], groups, axis=1)  # (R, G)
    neg = np.add.reduceat(w[:, order] * ~y[order], groups, axis=1)  # (R, G)
    below = np.cumsum(neg, axis=1) - neg
    P, Nneg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((P > 0) & (Nneg > 0), (pos * (below + neg / 2)).sum(axis=1) / (P * Nneg), np.nan)


def auroc(y_true, y_score):
    """AUROC of one score vector (see auroc_rows); NaN when y_true holds one class only."""
    return float(auroc_rows(y_true, y_score)[0])


def image_weights(n, n_boot, rng):
    """(n_boot, n): how many times each of n test images is drawn in each resample with replacement."""
    idx = rng.integers(0, n, (n_boot, n))  # (R, N): the images of each resample
    return np.bincount((np.arange(n_boot)[:, None] * n + idx).ravel(), minlength=n_boot * n).reshape(n_boot, n)


def nanmean(values, axis):
    with warnings.catch_warnings():  # a resample with no defined label gives NaN, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def scores(prediction, weights, groups=None, located=None):
    """
    Every score of one model under each row of image weights (R, N): {name: (R,)}. 'mean local' is the mean AUROC
    over the labels defined in that resample, a group's name the mean over its labels (groups: {name: [label
    index]}), 'normal/abnormal' the global AUROC; with located = (rows, in_box, hit) per image that has boxes
    (from localization_score), 'attention in box' and 'pointing game' are their weighted means.
    """
    local, abnormal, y_local, y_abnormal = prediction
    per_label = np.stack([auroc_rows(y_local[:, k], local[:, k], weights) for k in range(y_local.shape[1])], 1)  # (R, L)
    out = {"mean local": nanmean(per_label, 1), "per label": per_label}
    out.update({name: nanmean(per_label[:, index], 1) for name, index in (groups or {}).items()})
    out["normal/abnormal"] = auroc_rows(y_abnormal, abnormal, weights)
    if located is not None:
        rows, in_box, hit = located
        w = weights[:, rows]  # (R, images with boxes)
        out["attention in box"], out["pointing game"] = (w @ in_box) / w.sum(1), (w @ hit) / w.sum(1)
    return out


def bootstrap(predictions, n_boot=1000, seed=0):
    """
    Resamples the test images with replacement n_boot times (the same resamples for every model, so that
    differences are paired) and returns, per model, the resampled mean local AUROC (over the labels defined in
    each resample) and normal/abnormal AUROC, each (n_boot,). predictions: (local, abnormal, y_local, y_abnormal)
    per model, on the same images in the same order.
    """
    weights = image_weights(len(predictions[0][3]), n_boot, np.random.default_rng(seed))
    out = []
    for prediction in predictions:
        s = scores(prediction, weights)
        out.append(dict(mean_local_auroc=s["mean local"], normal_abnormal_auroc=s["normal/abnormal"], per_label=s["per label"]))
    return out


def interval(samples):
    """The 95% percentile interval of bootstrap samples, as [low, high]; NaN where no resample defines the score."""
    samples = np.asarray(samples, np.float64)
    if not np.isfinite(samples).any():
        return [math.nan, math.nan]
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def paired_difference(point_a, point_b, samples_a, samples_b):
    """b - a with its 95% interval and a two-sided bootstrap p-value (how often the resampled difference crosses 0)."""
    d = samples_b - samples_a
    return dict(difference=float(point_b - point_a), ci=interval(d), p_value=p_value(d), resamples=len(d))


def p_value(d):
    """
    Two-sided bootstrap p-value of resampled differences d: twice the share of resamples on the smaller side of 0
    (NaN where no resample defines the difference). It is how surprising a difference this far from 0 would be if
    the resampled units (test images; seeds too when pooled) were all the noise there is; it is not the chance
    that the difference is 0, nor that it would repeat on other data.
    """
    d = np.asarray(d, np.float64)
    d = d[np.isfinite(d)]
    if not len(d):
        return math.nan
    return float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))


def p_text(p, resamples):
    """'p = 0.034', 'p < 0.002' when no resample crossed 0 (the bootstrap cannot say more), or 'p n/a'."""
    if math.isnan(p):
        return "p n/a"
    return f"p < {2 / resamples:.3f}" if p == 0 else f"p = {p:.3f}"


def number(value, signed=False):
    """A score as the tables print it: 0.736 (+0.015 with signed), or n/a where it is undefined."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def span(ci, signed=False):
    """An interval as the tables print it: [0.709, 0.761], or n/a."""
    return "n/a" if math.isnan(ci[0]) else f"[{number(ci[0], signed)}, {number(ci[1], signed)}]"


@torch.no_grad()
def predict(model, dataset, res, norm, device, batch_size=32):
    """Returns local probabilities (N, L), P(abnormal) (N,), and the matching targets, in dataset order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    local, abnormal, y_local, y_abnormal = [], [], [], []
    for images, targets, target_abnormal, _ in loader:
        z_local, z_global, _ = model(model_input(images.to(device), res, norm))
        local.append(torch.sigmoid(z_local).float().cpu())
        abnormal.append(torch.softmax(z_global.float(), dim=-1)[:, 1].cpu())
        y_local.append(targets)
        y_abnormal.append(target_abnormal)
    return (torch.cat(local).numpy(), torch.cat(abnormal).numpy(), torch.cat(y_local).numpy(),
            torch.cat(y_abnormal).numpy())


def metrics(local, abnormal, y_local, y_abnormal, label_names):
    per_label = {}
    for k, name in enumerate(label_names):
        pos = int(y_local[:, k].sum())
        per_label[name] = dict(auroc=auroc(y_local[:, k], local[:, k]), positives=pos, negatives=len(y_local) - pos)
    defined = [m["auroc"] for m in per_label.values() if not math.isnan(m["auroc"])]
    return dict(per_label=per_label, mean_local_auroc=float(np.mean(defined)) if defined else float("nan"),
                labels_defined=len(defined), labels_total=len(label_names),
                normal_abnormal_auroc=auroc(y_abnormal, abnormal), n_images=int(len(y_abnormal)),
                n_abnormal=int(np.sum(y_abnormal)))


# ------------------------------------------------------------------------------------- attention as explanation

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
        H = mlcak_map(attentions)              # (B, T, T)
        row = H[:, 0, 1:] if model.cfg.global_pool == "token" else H[:, 1:, 1:].mean(1)  # (B, N)
        out.append((row / row.sum(1, keepdim=True)).reshape(-1, g, g).float().cpu())  # (B, N) -> (B, g, g)
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


def write_figures(folder, dataset, loaded, rows, device):
    """One PNG per test image (input, then each checkpoint's map), and overview.png stacking them all."""
    os.makedirs(folder, exist_ok=True)
    size = dataset.meta["size"]
    maps = [upsample(attention_maps(m, dataset, rows, c["res"], c["norm"], device), size) for m, c in loaded]
    figures = []
    for k, n in enumerate(rows):
        hr, boxes = dataset.image(n), dataset.boxes(n)
        panels = [panel(hr[0].numpy(), boxes, f"{os.path.basename(dataset.image_ids[n])[:16]} @{size}")]
        for (model, ckpt), m in zip(loaded, maps):
            seen = simulate_low_resolution(hr[None], ckpt["res"])[0, 0].numpy()  # what this model saw, before normalization
            panels.append(panel(seen, boxes, run_name(ckpt), heat=m[k]))
        figure = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
        for j, p in enumerate(panels):
            figure.paste(p, (j * p.width, 0))
        figure.save(os.path.join(folder, file_name(dataset.image_ids[n]) + ".png"))
        figures.append(figure)
    overview = Image.new("RGB", (figures[0].width, sum(f.height for f in figures)), "white")
    for j, f in enumerate(figures):
        overview.paste(f, (0, j * f.height))
    overview.save(os.path.join(folder, "overview.png"))
    return len(figures)


def file_name(image_id):
    """An image id as a file name: ids may hold folders (test/NORMAL/x.jpeg -> test_NORMAL_x.jpeg)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)


def pick_rows(dataset, ids=None, count=6):
    """Cache rows to draw: the given image ids, or else the test images with the most boxes."""
    if ids:
        known = {i: n for n, i in enumerate(dataset.image_ids)}
        missing = [i for i in ids if i not in known]
        if missing:
            raise data.DataError(f"--map-ids: image {missing[0]} is not in the test set")
        return [known[i] for i in ids]
    return sorted((int(n) for n in dataset.indices), key=lambda n: (-len(dataset.boxes(n)), n))[:count]


def evaluate_checkpoints(paths, dataset, device="cpu", n_boot=1000, pairs=None, write_json=True, seed=0, groups=None):
    """
    Evaluates checkpoints on one test set: AUROC per label, mean local AUROC (over all labels, and over each group
    of labels in groups: {name: [label]}), normal/abnormal AUROC, and the localization of their attention where the
    test set has boxes; with 95% bootstrap intervals (n_boot resamples of the test images, shared by all
    checkpoints) and paired differences: for each (i, j) in pairs (default: every checkpoint against the first)
    the difference j - i. Writes <checkpoint>.eval.json beside each. The resampled scores of each checkpoint are
    kept in result["_samples"] (not written), for seed_report.
    """
    n, rng = len(dataset), np.random.default_rng(seed)
    weights = image_weights(n, n_boot, rng) if n_boot else None
    index = {name: [dataset.label_names.index(label) for label in labels] for name, labels in (groups or {}).items()}
    results = []
    for path in paths:
        model, ckpt = load_checkpoint(path, device)
        if ckpt["vit_config"]["img_size"] != dataset.meta["size"]:
            raise data.DataError(f"{path}: sees {ckpt['vit_config']['img_size']} px images, the test set was decoded at "
                                 f"{dataset.meta['size']} px (for {paths[0]}); evaluate checkpoints of one --img-size together")
        if dataset.label_names != ckpt["label_names"]:
            first = next((k for k, (a, b) in enumerate(zip(ckpt["label_names"], dataset.label_names)) if a != b), None)
            where = (f"label {first + 1} is '{ckpt['label_names'][first]}', the test set's '{dataset.label_names[first]}'"
                     if first is not None else f"{len(ckpt['label_names'])} labels, the test set {len(dataset.label_names)}")
            raise data.DataError(f"{path}: trained on other labels than the test set has ({where})")
        prediction = predict(model, dataset, ckpt["res"], ckpt["norm"], device)
        result = metrics(*prediction, dataset.label_names)
        located = localization_score(model, ckpt, dataset, device)
        located_rows = None
        if located:  # the per-image arrays feed the bootstrap; the result keeps the summary
            located_rows = (located.pop("rows"), located.pop("in_box"), located.pop("hit"))
        point = scores(prediction, np.ones((1, n)), index, located_rows)
        result.update(checkpoint=path, name=run_name(ckpt), seed=ckpt.get("args", {}).get("seed"), localization=located,
                      scores={k: float(v[0]) for k, v in point.items() if k != "per label"})
        if n_boot:
            samples = scores(prediction, weights, index, located_rows)
            result["intervals"] = {k: interval(v) for k, v in samples.items() if k != "per label"}
            result["mean_local_auroc_ci"] = result["intervals"]["mean local"]
            result["normal_abnormal_auroc_ci"] = result["intervals"]["normal/abnormal"]
            for k, m in enumerate(result["per_label"].values()):
                m["ci"] = interval(samples["per label"][:, k]) if not math.isnan(m["auroc"]) else None
            result["_samples"] = samples
        results.append(result)
    if pairs is None:
        pairs = [(0, j) for j in range(1, len(paths))]
    if n_boot:
        for i, j in pairs:
            a, b = results[i], results[j]
            results[j].setdefault("differences", []).append(dict(against=a["name"], **{
                key: paired_difference(a["scores"][key], b["scores"][key], a["_samples"][key], b["_samples"][key])
                for key in a["scores"]}))
    if write_json:
        for r in results:
            path = os.path.splitext(r["checkpoint"])[0] + ".eval.json"
            try:
                with open(path, "w") as f:
                    json.dump({k: v for k, v in r.items() if not k.startswith("_")}, f, indent=1)
                r["eval_json"] = path
            except OSError as err:  # a read-only run folder: the results are still printed
                print(f"evaluate: cannot write {path} ({type(err).__name__}: {err.strerror}); results printed only",
                      file=sys.stderr)
    return results


def run_name(ckpt):
    """teacher@224, baseline@28, mlcak@28: the role and the resolution the model sees."""
    return f"{ckpt['role']}@{ckpt['res']}"


def label_groups(path):
    """{name: [label]} from label_groups.json beside a dataset (the synthetic set's coarse/subtle/fine), or {}."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(folder, "label_groups.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def format_table(results):
    """Several evaluations of one test set side by side: a row per label, a column per checkpoint."""
    first = results[0]["per_label"]
    width = max(14, *(len(r["name"]) for r in results)) + 2  # 14: an interval, [0.000, 1.000]

    def row(label, cells):
        return f"{label:<32}" + "".join(f"{c:>{width}}" for c in cells)

    lines = [f"{'label':<22}{'pos/neg':>10}" + "".join(f"{r['name']:>{width}}" for r in results)]
    for name, m in first.items():
        cells = [number(r["per_label"][name]["auroc"]) for r in results]
        lines.append(f"{name[:22]:<22}{m['positives']:>5}/{m['negatives']:<4}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append(row(f"mean local AUROC ({results[0]['labels_defined']}/{results[0]['labels_total']} labels)",
                     [number(r["mean_local_auroc"]) for r in results]))
    groups = [k for k in results[0].get("scores", {}) if k not in ("mean local", "normal/abnormal", "attention in box", "pointing game")]
    lines += [row(f"  {g} findings", [number(r["scores"][g]) for r in results]) for g in groups]
    lines.append(row("normal/abnormal AUROC", [number(r["normal_abnormal_auroc"]) for r in results]))
    if "intervals" in results[0]:
        for key, label in (("mean local", "  95% interval, mean local"), ("normal/abnormal", "  95% interval, normal/abn.")):
            lines.append(row(label, [span(r["intervals"][key]) for r in results]))
    if results[0].get("localization"):
        for key in ("attention in box", "pointing game"):
            lines.append(row(key, [number(r["scores"][key]) for r in results]))
        lines.append(row("  (uniform map: chance)", [number(results[0]["localization"]["chance"])]))
    if math.isnan(results[0]["normal_abnormal_auroc"]):
        kind = "abnormal" if results[0]["n_abnormal"] == results[0]["n_images"] else "normal"
        lines.append(f"normal/abnormal AUROC is n/a: all {results[0]['n_images']} test images are {kind}, so there "
                     "is no normal-abnormal pair to rank")
    for r in results:
        for d in r.get("differences", []):
            m = d["mean local"]
            lines.append(f"{r['name']} - {d['against']}: mean local AUROC {number(m['difference'], True)} "
                         f"{span(m['ci'], True)}, {p_text(m['p_value'], m['resamples'])} (two-sided, paired bootstrap "
                         f"over the {r['n_images']} test images)")
    return "\n".join(lines)


def markdown_table(results):
    """The paper's resolution table: a row per checkpoint, AUROC with intervals, localization, mlcak - baseline."""

    def fmt(r, key):  # a score, with its interval where there is one
        return number(r["scores"][key]) + (" " + span(r["intervals"][key]) if "intervals" in r else "")

    boxes = results[0].get("localization") is not None  # without boxes, no localization columns
    header = ["model", "mean local AUROC [95% CI]", "normal/abnormal AUROC [95% CI]"]
    header += ["attention in box", "pointing game"] if boxes else []
    header += ["difference in mean local AUROC [95% CI], p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        diff = "; ".join(f"{r['name'].split('@')[0]} - {d['against'].split('@')[0]}: "
                         f"{number(d['mean local']['difference'], True)} {span(d['mean local']['ci'], True)}, "
                         f"{p_text(d['mean local']['p_value'], d['mean local']['resamples'])}" for d in r.get("differences", []))
        cells = [r["name"], fmt(r, "mean local"), fmt(r, "normal/abnormal")]
        cells += [number(r["scores"][k]) for k in ("attention in box", "pointing game")] if boxes else []
        lines.append("| " + " | ".join(cells + [diff]) + " |")
    if boxes:
        chance = results[0]["localization"]["chance"]
        lines.append(f"| uniform map (chance) | | | {chance:.3f} | {chance:.3f} | |")
    return "\n".join(lines)


def hierarchical(samples, rng):
    """
    A hierarchical bootstrap over seeds and test images, for seeds scored on one shared test set: samples (S, R)
    holds S seeds' scores (or paired differences) under R resamples of the test images, column r the same resample
    of the same images for every seed and every model. Draw r takes S seeds with replacement and averages their
    values under image resample r: one image resample serves all seeds of a draw, as they all saw those images
    (resampling the images anew for each seed would treat one test set as S independent ones and shrink the
    image-level uncertainty by sqrt(S)). Returns (R,).
    """
    S, R = samples.shape
    seeds = rng.integers(0, S, (R, S))  # (R, S): the seeds of each draw
    return nanmean(samples[seeds, np.arange(R)[:, None]], 1)  # (R, S) -> (R,)


def seed_report(results, seed=0):
    """
    Markdown tables over seeds, from evaluate_checkpoints of several seeds' checkpoints on one test set (with
    bootstrap resamples): per model (role@res), each score's mean, sd and range over the seeds, and its mean with a
    95% interval from a hierarchical bootstrap (seeds, and the shared test images); per seed, mlcak - baseline at
    each resolution with its paired bootstrap interval over the test images; pooled over seeds, the mean difference
    with its hierarchical interval and two-sided bootstrap p-value.
    """
    keys, rng = list(results[0]["scores"]), np.random.default_rng(seed)
    n_images, resamples = results[0]["n_images"], len(results[0]["_samples"]["mean local"])

    def order(r):  # teacher, baseline, mlcak; high resolution first
        role, res = r["name"].split("@")
        return {"teacher": 0, "baseline": 1}.get(role, 2), -int(res)

    def spread(v):
        sd = np.std(v, ddof=1) if len(v) > 1 else 0
        return f"{np.mean(v):.3f} +- {sd:.3f} ({min(v):.3f} to {max(v):.3f})"

    models = {}
    for r in sorted(results, key=order):
        if r["seed"] in models.setdefault(r["name"], {}):
            raise data.DataError(f"--seeds: {models[r['name']][r['seed']]['checkpoint']} and {r['checkpoint']} are both "
                                 f"{r['name']} of seed {r['seed']}; give each seed's run once")
        models[r["name"]][r["seed"]] = r
    header = ["| model | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    lines = [f"{n_images} test images, {resamples} bootstrap resamples; {len(results[0]['per_label'])} local labels.", "",
             "Mean +- sd (range) over seeds:", ""] + header
    for name, by_seed in models.items():
        lines.append(f"| {name} | {len(by_seed)} | " + " | ".join(spread([r["scores"][k] for r in by_seed.values()]) for k in keys) + " |")
    lines += ["", "Mean over seeds [95% interval, hierarchical bootstrap: seeds with replacement, and one resample of "
              "the test images shared by all seeds in each draw]:", ""] + header
    for name, by_seed in models.items():
        cells = []
        for k in keys:
            ci = interval(hierarchical(np.stack([r["_samples"][k] for r in by_seed.values()]), rng))
            cells.append(f"{number(np.mean([r['scores'][k] for r in by_seed.values()]))} {span(ci)}")
        lines.append(f"| {name} | {len(by_seed)} | " + " | ".join(cells) + " |")
    for name in models:
        res = name.split("@")[1]
        if not name.startswith("mlcak@") or f"baseline@{res}" not in models:
            continue
        mlcak, baseline = models[name], models[f"baseline@{res}"]
        seeds = sorted(set(mlcak) & set(baseline))
        lines += ["", f"{name} - baseline@{res}: per seed [95% interval, paired bootstrap over the test images], and "
                  f"pooled over the {len(seeds)} seeds [95% interval, hierarchical bootstrap as above] with its two-sided "
                  "bootstrap p-value:", "", "| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for s in seeds:
            cells = [paired_difference(baseline[s]["scores"][k], mlcak[s]["scores"][k], baseline[s]["_samples"][k],
                                       mlcak[s]["_samples"][k]) for k in keys]
            lines.append(f"| {s} | " + " | ".join(f"{number(d['difference'], True)} {span(d['ci'], True)}" for d in cells) + " |")
        cells = []
        for k in keys:
            points = [mlcak[s]["scores"][k] - baseline[s]["scores"][k] for s in seeds]
            d = hierarchical(np.stack([mlcak[s]["_samples"][k] - baseline[s]["_samples"][k] for s in seeds]), rng)
            cells.append(f"**{number(np.mean(points), True)}** {span(interval(d), True)}, {p_text(p_value(d), len(d))}")
        lines.append("| pooled | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_dataset(ckpt, data_path=None, cache_dir=None):
    """The test set a checkpoint names (its cache, else its data source), or the one at data_path."""
    if data_path is None and os.path.isfile(os.path.join(ckpt["data"]["test_cache"], "meta.json")):
        try:
            return data.XrayDataset(ckpt["data"]["test_cache"])
        except data.DataError:  # damaged or of another version: made again from the source below
            pass
    options = {k: ckpt["args"][k] for k in ("readers", "uncertain", "views", "boxes") if k in ckpt["args"]}
    source = layouts.load_source(data_path or ckpt["data"]["path"], "test", **options)
    return data.XrayDataset(data.build_cache(source, ckpt["vit_config"]["img_size"], cache_dir))


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints written by train.py")
    parser.add_argument("--data", help="dataset folder or CSV to test on (default: the one the first checkpoint names)")
    parser.add_argument("--cache-dir", help="where decoded images are cached (default: data/cache in this project)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    parser.add_argument("--maps", metavar="DIR", help="write attention-map figures (one PNG per image, overview.png) here")
    parser.add_argument("--map-ids", help="comma-separated test image ids to draw (default: those with the most boxes)")
    parser.add_argument("--num-maps", type=int, default=6, help="how many images to draw when --map-ids is not given")
    parser.add_argument("--seeds", action="store_true", help="the checkpoints are runs of several seeds: also print "
                        "tables over seeds (mean, sd, range; mlcak - baseline per seed and pooled)")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.maps and writable(args.maps):
        parser.error(f"--maps {args.maps}: cannot write there ({writable(args.maps)})")
    if args.seeds and not args.bootstrap:
        parser.error("--seeds needs --bootstrap resamples")
    try:
        _, first = load_checkpoint(args.checkpoints[0])
        dataset = test_dataset(first, args.data, args.cache_dir)
        groups = label_groups(args.data or first["data"]["path"])
        results = evaluate_checkpoints(args.checkpoints, dataset, device, args.bootstrap, seed=args.seed, groups=groups)
        if args.maps:
            rows = pick_rows(dataset, args.map_ids.split(",") if args.map_ids else None, args.num_maps)
            loaded = [load_checkpoint(p, device) for p in args.checkpoints]
            count = write_figures(args.maps, dataset, loaded, rows, device)
    except (data.DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(format_table(results))
    for r in results:
        if r.get("eval_json"):
            print(f"wrote {r['eval_json']}")
    if args.maps:
        print(f"wrote {count} figures and overview.png to {args.maps}")
    if args.seeds:
        print("\n" + seed_report(results, args.seed))


if __name__ == "__main__":
    main()
