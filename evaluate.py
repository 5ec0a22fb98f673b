"""
Evaluates MLCAK checkpoints on a test set: AUROC per local label (MLCT) with its numbers of positives and
negatives, their mean over the labels where AUROC is defined, and normal/abnormal AUROC (MCCT).

    python evaluate.py runs/teacher-224-*/best.pt runs/student-28-*/best.pt
    python evaluate.py CKPT --data /data/vindr-cxr      # another dataset than the one the checkpoint names

A student checkpoint is evaluated at its own resolution (the HR test image, reduced by
mlcak.simulate_low_resolution). Each checkpoint gets a JSON file beside it (best.pt -> best.eval.json).
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

import data
from mlcak import simulate_low_resolution
from vit import ViTConfig, VisionTransformer


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit code 2), not a usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def auroc(y_true, y_score):
    """
    Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting 1/2,
    from ranks (Mann-Whitney U): (sum of positive ranks - P(P+1)/2) / (P * Nneg), with tied scores given their
    mean rank. NaN when y_true holds one class only (never 0 or 0.5, which would bias a mean).
    """
    y_true, y_score = np.asarray(y_true).astype(bool).ravel(), np.asarray(y_score, np.float64).ravel()
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(y_score, kind="mergesort")
    sorted_scores = y_score[order]
    # tied runs share the mean of the ranks they span (ranks start at 1)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(sorted_scores)]
    ranks = np.empty(len(y_score))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def device_from(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def model_input(images, res, norm):
    """HR batch in [0, 1] -> what a model at resolution res sees: simulated LR (if res < HR), then normalized."""
    mean, std = norm
    return (simulate_low_resolution(images, res) - mean) / std


@torch.no_grad()
def predict(model, dataset, res, norm, device, batch_size=128):
    """Returns local probabilities (N, L), P(abnormal) (N,), and the matching targets, in dataset order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    local, abnormal, y_local, y_abnormal = [], [], [], []
    for images, targets, target_abnormal, _ in loader:
        z_local, z_global, _ = model(model_input(images.to(device), res, norm))
        local.append(torch.sigmoid(z_local).float().cpu())
        abnormal.append(torch.softmax(z_global.float(), dim=-1)[:, 1].cpu())
        y_local.append(targets), y_abnormal.append(target_abnormal)
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
                normal_abnormal_auroc=auroc(y_abnormal, abnormal), n_images=int(len(y_abnormal)))


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by train.py -> (model in eval mode, the checkpoint dict). Plain tensors and values only."""
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = VisionTransformer(ViTConfig(**ckpt["vit_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as err:
        raise data.DataError(f"{path}: not a checkpoint written by train.py ({type(err).__name__}: {err})") from None
    return model.to(device).eval(), ckpt


def evaluate_checkpoint(path, dataset, device="cpu", write_json=True):
    model, ckpt = load_checkpoint(path, device)
    if dataset.label_names != ckpt["label_names"]:
        raise data.DataError(f"{path}: trained on labels {ckpt['label_names'][:3]}..., the test set has "
                             f"{dataset.label_names[:3]}...; they must match")
    result = metrics(*predict(model, dataset, ckpt["res"], ckpt["norm"], device), dataset.label_names)
    result.update(checkpoint=path, name=run_name(ckpt))
    if write_json:
        with open(os.path.splitext(path)[0] + ".eval.json", "w") as f:
            json.dump(result, f, indent=1)
    return result


def run_name(ckpt):
    if ckpt["role"] == "teacher":
        return f"teacher@{ckpt['res']}"
    return f"{'MLCAK' if ckpt['kd'] else 'baseline'} student@{ckpt['res']}"


def format_table(results):
    """Several evaluations of one test set side by side: a row per label, a column per checkpoint."""
    first = results[0]["per_label"]
    width = max(len(r["name"]) for r in results) + 2
    lines = [f"{'label':<22}{'pos/neg':>10}" + "".join(f"{r['name']:>{width}}" for r in results)]
    for name, m in first.items():
        cells = ["n/a" if math.isnan(r["per_label"][name]["auroc"]) else f"{r['per_label'][name]['auroc']:.3f}"
                 for r in results]
        lines.append(f"{name[:22]:<22}{m['positives']:>5}/{m['negatives']:<4}" + "".join(f"{c:>{width}}" for c in cells))
    mean = f"mean local AUROC ({results[0]['labels_defined']}/{results[0]['labels_total']} labels)"
    lines.append(f"{mean:<32}" + "".join(f"{r['mean_local_auroc']:>{width}.3f}" for r in results))
    lines.append(f"{'normal/abnormal AUROC':<32}" + "".join(f"{r['normal_abnormal_auroc']:>{width}.3f}" for r in results))
    return "\n".join(lines)


def test_dataset(ckpt, data_path=None, cache_dir=None):
    """The test set a checkpoint names (its cache, else its data source), or the one at data_path."""
    if data_path is None and os.path.isfile(os.path.join(ckpt["data"]["test_cache"], "meta.json")):
        return data.XrayDataset(ckpt["data"]["test_cache"])
    source = data.load_source(data_path or ckpt["data"]["path"], "test", ckpt["args"]["readers"])
    return data.XrayDataset(data.build_cache(source, ckpt["vit_config"]["img_size"], cache_dir))


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints written by train.py")
    parser.add_argument("--data", help="VinDr/Kaggle folder or CSV to test on (default: the one each checkpoint names)")
    parser.add_argument("--cache-dir", help="where decoded images are cached (default: data/cache in this project)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    args = parser.parse_args(argv)
    device = device_from(args.device)
    try:
        results = []
        for path in args.checkpoints:
            _, ckpt = load_checkpoint(path)
            results.append(evaluate_checkpoint(path, test_dataset(ckpt, args.data, args.cache_dir), device))
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(format_table(results))
    for r in results:
        print(f"wrote {os.path.splitext(r['checkpoint'])[0]}.eval.json")


if __name__ == "__main__":
    main()
