"""
Evaluates MLCAK checkpoints on a test set: AUROC per local label (MLCT) with its numbers of positives and
negatives, their mean over the labels where AUROC is defined, and normal/abnormal AUROC (MCCT), with bootstrap
intervals (bootstrap.py) and the localization of each model's attention (maps.py).

    python evaluate.py runs/teacher-224-*/best.pt runs/mlcak-28-*/best.pt
    python evaluate.py CKPT --data /data/vindr-cxr      # another dataset than the one the checkpoint names
    python evaluate.py CKPT... --maps figures/          # attention maps over the images (the paper's Fig. 3)
    python evaluate.py runs/*/best.pt --seeds           # runs of several seeds: tables over seeds, pooled tests
    python evaluate.py CKPT... --images scans/ x.dcm    # your own X-rays, unlabelled: predictions.csv (predict.py)

A student checkpoint is evaluated at its own resolution (the HR test image, reduced by
mlcak.simulate_low_resolution). Each checkpoint gets a JSON file beside it (best.pt -> best.eval.json).
"""

import argparse
import json
import math
import os
import sys

import numpy as np

import data
import layouts
from bootstrap import auroc_rows, hierarchical, image_weights, interval, mean_over_defined, p_value, paired_difference
from maps import localization_score, pick_rows, write_figures
from predict import predict, predict_images
from runtime import CheckpointError, Parser, load_checkpoint, pick_device, run_cli, run_name, writable


def scores(prediction, weights, groups=None, located=None):
    """
    Every score of one model, the one place each is computed, under each row of image weights (R, N): {name: (R,)};
    weights of ones (1, N) give the scores on the test set itself. 'per label' is AUROC per local label (R, L),
    'mean local' their mean over the labels defined in that resample, a group's name the mean over its labels
    (groups: {name: [label index]}), 'normal/abnormal' the global AUROC; with located = (rows, in_box, hit) per image
    that has boxes (from maps.localization_score), 'attention in box' and 'pointing game' are their weighted means.
    """
    local, abnormal, y_local, y_abnormal = prediction
    per_label = np.stack([auroc_rows(y_local[:, k], local[:, k], weights) for k in range(y_local.shape[1])], 1)  # (R, L)
    out = {"mean local": mean_over_defined(per_label), "per label": per_label}
    out.update({name: mean_over_defined(per_label[:, index]) for name, index in (groups or {}).items()})
    out["normal/abnormal"] = auroc_rows(y_abnormal, abnormal, weights)
    if located is not None:
        rows, in_box, hit = located
        w = weights[:, rows]  # (R, images with boxes)
        out["attention in box"], out["pointing game"] = (w @ in_box) / w.sum(1), (w @ hit) / w.sum(1)
    return out


def summary(prediction, label_names):
    """The scores on the test set itself, with each label's counts: what train.py validates on and prints."""
    point = scores(prediction, np.ones((1, len(prediction[3]))))
    positives = prediction[2].sum(0).astype(int)
    per_label = {name: dict(auroc=float(point["per label"][0, k]), positives=int(positives[k]),
                            negatives=len(prediction[2]) - int(positives[k])) for k, name in enumerate(label_names)}
    return dict(per_label=per_label, mean_local_auroc=float(point["mean local"][0]),
                labels_defined=int(np.isfinite(point["per label"][0]).sum()), labels_total=len(label_names),
                normal_abnormal_auroc=float(point["normal/abnormal"][0]), n_images=len(prediction[3]),
                n_abnormal=int(np.sum(prediction[3])))


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
        check_fit(path, ckpt, dataset, paths[0])
        prediction = predict(model, dataset, ckpt["res"], ckpt["norm"], device)
        result = summary(prediction, dataset.label_names)
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


def check_fit(path, ckpt, dataset, first):
    """A checkpoint is scored on images of its own size and with its own labels; anything else is one line."""
    if ckpt["vit_config"]["img_size"] != dataset.meta["size"]:
        raise data.DataError(f"{path}: sees {ckpt['vit_config']['img_size']} px images, the test set was decoded at "
                             f"{dataset.meta['size']} px (for {first}); evaluate checkpoints of one --img-size together")
    if dataset.label_names != ckpt["label_names"]:
        k = next((k for k, (a, b) in enumerate(zip(ckpt["label_names"], dataset.label_names)) if a != b), None)
        where = (f"label {k + 1} is '{ckpt['label_names'][k]}', the test set's '{dataset.label_names[k]}'" if k is not None
                 else f"{len(ckpt['label_names'])} labels, the test set {len(dataset.label_names)}")
        raise data.DataError(f"{path}: trained on other labels than the test set has ({where})")


def label_groups(path):
    """{name: [label]} from label_groups.json beside a dataset (the synthetic set's coarse/subtle/fine), or {}."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(folder, "label_groups.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ tables

def number(value, signed=False):
    """A score as the tables print it: 0.736 (+0.015 with signed), or n/a where it is undefined."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def span(ci, signed=False):
    """An interval as the tables print it: [0.709, 0.761], or n/a."""
    return "n/a" if math.isnan(ci[0]) else f"[{number(ci[0], signed)}, {number(ci[1], signed)}]"


def p_text(p, resamples):
    """'p = 0.034', 'p < 0.002' when no resample crossed 0 (the bootstrap cannot say more), or 'p n/a'."""
    if math.isnan(p):
        return "p n/a"
    return f"p < {2 / resamples:.3f}" if p == 0 else f"p = {p:.3f}"


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
    ci = " [95% CI]" if "intervals" in results[0] else ""  # none under --bootstrap 0
    header = ["model", f"mean local AUROC{ci}", f"normal/abnormal AUROC{ci}"]
    header += ["attention in box", "pointing game"] if boxes else []
    header += ["difference in mean local AUROC [95% CI], p"] if ci else []  # paired differences need the resamples
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        diff = "; ".join(f"{r['name'].split('@')[0]} - {d['against'].split('@')[0]}: "
                         f"{number(d['mean local']['difference'], True)} {span(d['mean local']['ci'], True)}, "
                         f"{p_text(d['mean local']['p_value'], d['mean local']['resamples'])}" for d in r.get("differences", []))
        cells = [r["name"], fmt(r, "mean local"), fmt(r, "normal/abnormal")]
        cells += [number(r["scores"][k]) for k in ("attention in box", "pointing game")] if boxes else []
        lines.append("| " + " | ".join(cells + ([diff] if ci else [])) + " |")
    if boxes:
        chance = results[0]["localization"]["chance"]
        lines.append(f"| uniform map (chance) | | | {chance:.3f} | {chance:.3f} |" + (" |" if ci else ""))
    return "\n".join(lines)


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


# ------------------------------------------------------------------------------------------------ command line

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
    if args.images:
        clash = [flag for flag, given in (("--data", args.data), ("--seeds", args.seeds), ("--map-ids", args.map_ids)) if given]
        if clash:
            parser.error(f"--images predicts files, not a test set: {clash[0]} does not apply")
        if args.out_csv and writable(os.path.dirname(os.path.abspath(args.out_csv))):
            parser.error(f"--out-csv {args.out_csv}: cannot write there")
        predict_images(args.checkpoints, args.images, args.threshold, args.out_csv, args.maps, args.cache_dir, device)
        return
    _, first = load_checkpoint(args.checkpoints[0])
    dataset = test_dataset(first, args.data, args.cache_dir)
    groups = label_groups(args.data or first["data"]["path"])
    results = evaluate_checkpoints(args.checkpoints, dataset, device, args.bootstrap, seed=args.seed, groups=groups)
    if args.maps:
        rows = pick_rows(dataset, args.map_ids.split(",") if args.map_ids else None, args.num_maps)
        loaded = [load_checkpoint(p, device) for p in args.checkpoints]
        count = write_figures(args.maps, dataset, loaded, rows, device)
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
