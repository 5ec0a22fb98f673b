"""
Evaluates MLCAK checkpoints as the paper reports them: AUROC per local label (MLCT) and their mean, normal/abnormal
AUROC (MCCT), and where each model's attention falls (attention maps, the paper's Fig. 3), with bootstrap intervals.

    python evaluate.py runs/teacher-224-*/best.pt runs/mlcak-28-*/best.pt
    python evaluate.py CKPT --data /data/vindr-cxr      # another dataset than the one the checkpoint names
    python evaluate.py CKPT... --maps figures/          # attention maps over the images (the paper's Fig. 3)
    python evaluate.py runs/*/best.pt --seeds           # runs of several seeds: tables over seeds, pooled tests
    python evaluate.py CKPT... --images scans/ x.dcm    # your own X-rays, unlabelled: a line each and predictions.csv

    auroc(y, score)                      the paper's metric, from ranks (Mann-Whitney U)
    predict(model, dataset, res)         the model's probabilities: local (N, L) and P(abnormal) (N,)
    summary(prediction, label_names)     AUROC per label with its positives and negatives, their mean, normal/abnormal
    evaluate_checkpoints(paths, dataset) the above for each checkpoint, with intervals, localization, differences

A student checkpoint is evaluated at its own resolution (the HR test image, reduced by
mlcak.simulate_low_resolution). Each checkpoint gets a JSON file beside it (best.pt -> best.eval.json). The
bootstrap, the tables and the figures are in machinery/ (bootstrap.py, tables.py, attention_maps.py).
"""

import argparse
import csv
import json
import math
import os
import sys

import numpy as np
import torch

import data
from machinery.attention_maps import localization_score, pick_rows, write_figures
from machinery.bootstrap import image_weights, interval, paired_difference, scores
from machinery.runtime import (CheckpointError, Parser, atomic_open, label_mismatch, load_checkpoint, pick_device, run_cli,
                               run_name, writable)
from machinery.tables import format_table, seed_report
from mlcak import model_input


def auroc(y_true, y_score):
    """
    AUROC = P(score of a random positive > score of a random negative), ties counting one half: the Mann-Whitney U
    statistic of the P positives and N negatives, from the ranks of all scores (tied scores share their mean rank):

        AUROC = (sum of the positives' ranks - P (P + 1) / 2) / (P N)

    NaN for a label with one class only (never 0 or 0.5, which would bias a mean over labels).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        return math.nan
    _, group, counts = np.unique(np.asarray(y_score, np.float64).ravel(), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[group]  # 1-based; a tie group shares its mean rank
    return float((ranks[y].sum() - P * (P + 1) / 2) / (P * N))


@torch.no_grad()
def predict(model, dataset, res, norm, device, batch_size=32):
    """Local probabilities (N, L), P(abnormal) (N,) and the matching targets, in dataset order, each image seen at
    the model's resolution res."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    local, abnormal, y_local, y_abnormal = [], [], [], []
    for images, targets, target_abnormal, _ in loader:
        z_local, z_global, _ = model(model_input(images.to(device), res, norm))
        local.append(torch.sigmoid(z_local).float().cpu())
        abnormal.append(torch.softmax(z_global.float(), dim=-1)[:, 1].cpu())
        y_local.append(targets)
        y_abnormal.append(target_abnormal)
    return tuple(torch.cat(part).numpy() for part in (local, abnormal, y_local, y_abnormal))


def summary(prediction, label_names):
    """AUROC of each local label with its numbers of positives and negatives, the mean over the labels where AUROC is
    defined (both classes present), and normal/abnormal AUROC: what train.py validates on and prints."""
    local, abnormal, y_local, y_abnormal = prediction
    per_label = np.array([auroc(y_local[:, k], local[:, k]) for k in range(len(label_names))])
    defined = ~np.isnan(per_label)
    positives = y_local.sum(0).astype(int)
    return dict(per_label={name: dict(auroc=float(per_label[k]), positives=int(positives[k]),
                                      negatives=len(y_local) - int(positives[k])) for k, name in enumerate(label_names)},
                mean_local_auroc=float(per_label[defined].mean()) if defined.any() else math.nan,
                labels_defined=int(defined.sum()), labels_total=len(label_names),
                normal_abnormal_auroc=auroc(y_abnormal, abnormal), n_images=len(y_abnormal),
                n_abnormal=int(np.sum(y_abnormal)))


def evaluate_checkpoints(paths, dataset, device="cpu", n_boot=1000, pairs=None, write_json=True, seed=0, groups=None):
    """
    Evaluates checkpoints on one test set: summary() of each, the mean over each group of labels (groups: {name:
    [label]}), and the localization of its attention where the test set has boxes; with 95% bootstrap intervals
    (n_boot resamples of the test images, shared by all checkpoints) and paired differences: for each (i, j) in
    pairs (default: every checkpoint against the first) the difference j - i. Writes <checkpoint>.eval.json beside
    each. The resampled scores of each checkpoint are kept in result["_samples"] (not written), for seed_report.
    """
    n, rng = len(dataset), np.random.default_rng(seed)
    weights = image_weights(n, n_boot, rng) if n_boot else None
    index = {name: [dataset.label_names.index(label) for label in labels] for name, labels in (groups or {}).items()}
    results = []
    for path in paths:
        model, ckpt = load_checkpoint(path, device)
        check_fit(path, ckpt, dataset, paths[0])
        prediction = predict(model, dataset, ckpt["res"], ckpt["norm"], device)
        result = summary(prediction, dataset.label_names)
        located = localization_score(model, ckpt, dataset, device)
        located_rows = None
        if located:  # the per-image arrays feed the bootstrap; the result keeps the summary
            located_rows = (located.pop("rows"), located.pop("in_box"), located.pop("hit"))
        point = scores(prediction, np.ones((1, n)), index, located_rows)
        recipe = dict(ckpt["args"], train_cache=os.path.basename(ckpt["data"]["train_cache"]))  # what --seeds compares
        result.update(checkpoint=path, name=run_name(ckpt), seed=ckpt["args"].get("seed"), recipe=recipe, localization=located,
                      scores={k: float(v[0]) for k, v in point.items() if k != "per label"})
        if n_boot:
            samples = scores(prediction, weights, index, located_rows)
            result["intervals"] = {k: interval(v) for k, v in samples.items() if k != "per label"}
            for k, m in enumerate(result["per_label"].values()):
                m["ci"] = interval(samples["per label"][:, k]) if not math.isnan(m["auroc"]) else None
            result["_samples"] = samples
        results.append(result)
    pairs = [(0, j) for j in range(1, len(paths))] if pairs is None else pairs
    for i, j in pairs if n_boot else []:  # paired differences need the shared resamples
        a, b = results[i], results[j]
        b.setdefault("differences", []).append(dict(against=a["name"], **{
            key: paired_difference(a["scores"][key], b["scores"][key], a["_samples"][key], b["_samples"][key])
            for key in a["scores"]}))
    if write_json:
        for r in results:
            path = os.path.splitext(r["checkpoint"])[0] + ".eval.json"
            try:
                with atomic_open(path) as f:
                    json.dump({k: v for k, v in r.items() if not k.startswith("_")}, f, indent=1)
                r["eval_json"] = path
            except OSError as err:  # a read-only run folder: the results are still printed
                print(f"evaluate: cannot write {path} ({type(err).__name__}: {err.strerror}); results printed only",
                      file=sys.stderr)
    return results


def check_fit(path, ckpt, dataset, first):
    """A checkpoint is scored on images of its own size and with its own labels; anything else is one line."""
    if ckpt["vit_config"]["img_size"] != dataset.meta["size"]:
        raise data.DataError(f"{path}: sees {ckpt['vit_config']['img_size']} px images, the test set was decoded at "
                             f"{dataset.meta['size']} px (for {first}); evaluate checkpoints of one --img-size together")
    mismatch = label_mismatch(ckpt["label_names"], dataset.label_names, "the test set")
    if mismatch:
        raise data.DataError(f"{path}: trained on other labels than the test set has ({mismatch})")


def predict_images(checkpoints, paths, threshold=0.5, out_csv=None, maps=None, cache_dir=None, device="cpu"):
    """
    Every model on your own files (evaluate.py --images): one line per image and model with P(abnormal) and the
    local labels whose probability is at least threshold (else the three most probable), all probabilities in out_csv
    (default: predictions.csv beside the first checkpoint; a row per image and model, a column per label), and with
    maps the figures of --maps. Each file enters a model as the training images did: decoded and squashed to the
    checkpoint's --img-size in a cache (data.image_dataset), then brought to the model's resolution by
    mlcak.model_input. Unreadable files are listed and skipped; none readable at all is a DataError.
    """
    files, others, broken = data.image_files(paths)
    loaded = [load_checkpoint(p, device) for p in checkpoints]
    first = loaded[0][1]
    for path, (_, ckpt) in zip(checkpoints, loaded):
        if (ckpt["vit_config"]["img_size"], ckpt["label_names"]) != (first["vit_config"]["img_size"], first["label_names"]):
            raise data.DataError(f"{path}: another --img-size or other labels than {checkpoints[0]}; give models of one run")
    dataset, skipped = data.image_dataset(files, first["label_names"], first["vit_config"]["img_size"], cache_dir)
    for reason in [f"{link}: a link that leads to no file (broken, or a loop)" for link in broken] + skipped:
        print(f"skipped: {reason}")
    if others:
        print(f"ignored {len(others)} files that are not images (by their names, or by content where a name has no "
              f"extension), e.g. {others[0]}")
    if not len(dataset):
        raise data.DataError(f"--images {' '.join(paths)}: none of the {len(files)} files is a readable image"
                             + (f" (first: {skipped[0]})" if skipped else ""))
    rows, names = [int(n) for n in dataset.indices], first["label_names"]
    out_csv = out_csv or predictions_csv(checkpoints[0])
    with atomic_open(out_csv, "w", newline="", errors="surrogateescape") as f:  # whole, or the earlier file kept
        table = csv.writer(f)
        table.writerow(["path", "model", "checkpoint", "abnormal"] + names)
        for path, (model, ckpt) in zip(checkpoints, loaded):
            local, abnormal, _, _ = predict(model, dataset, ckpt["res"], ckpt["norm"], device)
            print(f"\n{run_name(ckpt)} ({path}): P(abnormal), and the local labels at p >= {threshold:g} (else the three "
                  "most probable)")
            for k, n in enumerate(rows):
                order = np.argsort(-local[k], kind="stable")
                above = [j for j in order if local[k, j] >= threshold]
                found = ", ".join(f"{names[j]} {local[k, j]:.2f}" for j in (above or order[:3]))
                print(f"{dataset.image_ids[n]}  abnormal {abnormal[k]:.3f}  {found if above else 'none; highest ' + found}")
                table.writerow([dataset.image_ids[n], run_name(ckpt), path, f"{abnormal[k]:.6f}"] + [f"{p:.6f}" for p in local[k]])
    print(f"\nwrote {len(rows)} images x {len(loaded)} model(s) to {out_csv}")
    if maps:
        print(f"wrote {write_figures(maps, dataset, loaded, rows, device)} figures and overview.png to {maps}")
    return out_csv


def predictions_csv(checkpoint):
    """Where --images writes without --out-csv: predictions.csv beside the (first) checkpoint."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "predictions.csv")


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
    parser.add_argument("--images", nargs="+", metavar="PATH", help="predict these files or folders (DICOM, PNG, JPEG, "
                        "...; any size, no labels) instead of a test set; with --maps, draw them")
    parser.add_argument("--threshold", type=float, default=0.5, help="with --images: list the local labels whose "
                        "probability is at least this, else the three most probable (all probabilities go to the CSV)")
    parser.add_argument("--out-csv", help="with --images: the CSV to write (default: predictions.csv beside the first CKPT)")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.maps and writable(args.maps):
        parser.error(f"--maps {args.maps}: cannot write there ({writable(args.maps)})")
    if args.seeds and not args.bootstrap:
        parser.error("--seeds needs --bootstrap resamples")
    for ok, message in ((args.bootstrap >= 0, f"--bootstrap must be 0 or more, got {args.bootstrap}"),
                        (args.seed >= 0, f"--seed must be 0 or more, got {args.seed}"),
                        (args.num_maps >= 1, f"--num-maps must be at least 1, got {args.num_maps}"),
                        (0 <= args.threshold <= 1, f"--threshold must be a probability in [0, 1], got {args.threshold}")):
        if not ok:  # (a NaN threshold fails its check too)
            parser.error(message)
    if args.images:
        clash = [flag for flag, given in (("--data", args.data), ("--seeds", args.seeds), ("--map-ids", args.map_ids)) if given]
        if clash:
            parser.error(f"--images predicts files, not a test set: {clash[0]} does not apply")
        out_csv = args.out_csv or predictions_csv(args.checkpoints[0])
        folder = os.path.dirname(os.path.abspath(out_csv))
        problem = "it is a folder" if os.path.isdir(out_csv) else (args.out_csv or os.path.isdir(folder)) and writable(folder)
        if problem:
            flag = f"--out-csv {args.out_csv}" if args.out_csv else f"predictions.csv beside {args.checkpoints[0]}"
            parser.error(f"{flag}: cannot write there ({problem}); give --out-csv a file in a folder you can write")
        predict_images(args.checkpoints, args.images, args.threshold, args.out_csv, args.maps, args.cache_dir, device)
        return
    _, first = load_checkpoint(args.checkpoints[0])
    dataset = data.test_dataset(first, args.data, args.cache_dir)
    groups = data.label_groups(args.data or first["data"]["path"])
    results = evaluate_checkpoints(args.checkpoints, dataset, device, args.bootstrap, seed=args.seed, groups=groups)
    if args.maps:
        rows = pick_rows(dataset, args.map_ids.split(",") if args.map_ids else None, args.num_maps)
        count = write_figures(args.maps, dataset, [load_checkpoint(p, device) for p in args.checkpoints], rows, device)
    print(format_table(results))
    for r in results:
        if r.get("eval_json"):
            print(f"wrote {r['eval_json']}")
    if args.maps:
        print(f"wrote {count} figures and overview.png to {args.maps}")
    if args.seeds:
        print("\n" + seed_report(results, args.seed))


def cli(argv=None):
    """main, with the command line's exit codes: a bad input is one line on stderr, not a traceback."""
    return run_cli(main, argv, (data.DataError, CheckpointError), resume=False)


if __name__ == "__main__":
    sys.exit(cli())
