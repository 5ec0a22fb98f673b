"""
The tables evaluate.py and train.py print: a test set's scores side by side, the paper's resolution table in
Markdown, and the tables over seeds with their pooled tests (the statistics themselves are in bootstrap.py).

    format_table(results)    a row per label, a column per checkpoint (what train.py ends with)
    markdown_table(results)  a row per checkpoint with intervals, localization and mlcak - baseline
    seed_report(results)     over seeds: mean, sd, range; mlcak - baseline per seed and pooled, with p-values
"""

import math

import numpy as np

from machinery.bootstrap import hierarchical, interval, p_value, paired_difference
from machinery.layouts import DataError

# what seeds of one model must share (each result's "recipe": its training flags and its training cache's name): the
# flags that change the numbers but the seed, the teacher file and the data's path as typed (the data by their cache
# instead); one model's seeds share alpha, beta, gamma too
SEED_FREE = ("model", "img_size", "epochs", "batch_size", "lr", "weight_decay", "warmup", "readers", "uncertain", "views",
             "boxes", "val_fraction", "init", "init_norm", "amp", "tf32", "compile", "train_cache")
FLAG_NAMES = {"train_cache": "training data (their caches differ)"}


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
    with its hierarchical interval and two-sided bootstrap p-value; and the paper's premise, pooled the same way: the
    teacher against each baseline, each baseline against the one of the next lower resolution.
    """
    keys, rng = list(results[0]["scores"]), np.random.default_rng(seed)
    n_images, resamples = results[0]["n_images"], len(results[0]["_samples"]["mean local"])

    def order(r):  # teacher, baseline, mlcak; high resolution first
        role, res = r["name"].split("@")
        return {"teacher": 0, "baseline": 1}.get(role, 2), -int(res)

    def pooled(a, b, seeds, bold=False):  # a - b for each score, pooled over seeds: mean [interval], p
        cells = []
        for k in keys:
            point = number(np.mean([a[s]["scores"][k] - b[s]["scores"][k] for s in seeds]), True)
            d = hierarchical(np.stack([a[s]["_samples"][k] - b[s]["_samples"][k] for s in seeds]), rng)
            cells.append(f"{f'**{point}**' if bold else point} {span(interval(d), True)}, {p_text(p_value(d), len(d))}")
        return cells

    def spread(v):
        sd = np.std(v, ddof=1) if len(v) > 1 else 0
        return f"{np.mean(v):.3f} +- {sd:.3f} ({min(v):.3f} to {max(v):.3f})"

    models = {}
    for r in sorted(results, key=order):
        if r["seed"] in models.setdefault(r["name"], {}):
            raise DataError(f"--seeds: {models[r['name']][r['seed']]['checkpoint']} and {r['checkpoint']} are both "
                                 f"{r['name']} of seed {r['seed']}; give each seed's run once")
        models[r["name"]][r["seed"]] = r
    # seeds of one recipe: another model, data set or schedule is not another seed. The teacher is given to the
    # students (it may have its own data and schedule, as README's study does): it is held to its own seeds only
    students = [o for o in results if not o["name"].startswith("teacher@")]
    for r in results:
        same = next(o for o in results if o["name"] == r["name"])
        for other in [same] + (students[:1] if not r["name"].startswith("teacher@") else []):
            shared = SEED_FREE if other["name"] != r["name"] else SEED_FREE + ("alpha", "beta", "gamma")
            differ = [k for k in shared if r.get("recipe", {}).get(k) != other.get("recipe", {}).get(k)]
            if differ:
                k = differ[0]
                raise DataError(f"--seeds: {other['checkpoint']} ({other['name']}) and {r['checkpoint']} ({r['name']}) were "
                                f"trained with other {FLAG_NAMES.get(k, '--' + k.replace('_', '-'))} ({other['recipe'].get(k)}"
                                f", {r['recipe'].get(k)}); pool the seeds of one recipe")
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
        if not seeds:
            lines += ["", f"{name} - baseline@{res}: no seed has both models (mlcak of seeds {sorted(mlcak)}, baseline of "
                      f"seeds {sorted(baseline)}), so there is no paired difference"]
            continue
        lines += ["", f"{name} - baseline@{res}: per seed [95% interval, paired bootstrap over the test images], and "
                  f"pooled over the {len(seeds)} seeds [95% interval, hierarchical bootstrap as above] with its two-sided "
                  "bootstrap p-value:", "", "| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for s in seeds:
            cells = [paired_difference(baseline[s]["scores"][k], mlcak[s]["scores"][k], baseline[s]["_samples"][k],
                                       mlcak[s]["_samples"][k]) for k in keys]
            lines.append(f"| {s} | " + " | ".join(f"{number(d['difference'], True)} {span(d['ci'], True)}" for d in cells) + " |")
        lines.append("| pooled | " + " | ".join(pooled(mlcak, baseline, seeds, bold=True)) + " |")
    # the paper's premise: the teacher above each baseline, each baseline above the one of the next lower resolution
    baselines = [name for name in models if name.startswith("baseline@")]  # highest resolution first
    premise = [(t, b) for t in models if t.startswith("teacher@") for b in baselines] + list(zip(baselines, baselines[1:]))
    premise = [(a, b, sorted(set(models[a]) & set(models[b]))) for a, b in premise]
    if any(seeds for _, _, seeds in premise):
        lines += ["", "The premise: each difference pooled over the seeds that have both models [95% interval, hierarchical "
                  "bootstrap as above] with its two-sided bootstrap p-value:", "",
                  "| difference | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        lines += [f"| {a} - {b} | {len(seeds)} | " + " | ".join(pooled(models[a], models[b], seeds)) + " |"
                  for a, b, seeds in premise if seeds]
    return "\n".join(lines)
