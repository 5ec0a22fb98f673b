"""
AUROC and the bootstrap behind every interval and p-value the project prints (evaluate.py), in numpy alone.

    auroc_rows(y, score, weights)      AUROC under each row of image weights: one sort serves every resample
    image_weights(n, R, rng)           R resamples of n test images with replacement, shared by every model
    interval, paired_difference        95% percentile intervals; paired differences with a two-sided bootstrap p
    hierarchical(samples, rng)         seeds with replacement, and one image resample shared by all seeds in a draw
    scores(prediction, weights)        every score of one model under each resample: per label, means, localization

What a p-value here is: twice the share of resampled differences on the far side of 0 (two-sided, bootstrap). It
says how often a difference this far from 0 would arise if the resampled units (the test images; and the seeds,
when pooled) were all the noise there is. It is not the chance that the difference is 0, nor that a study on other
data would find it; tests/test_statistics.py checks by simulation that it rejects a true null about 5% of the time.
"""

import math
import warnings

import numpy as np


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


def mean_over_defined(values):
    """(R, L) -> (R,): each row's mean over its defined (non-NaN) entries, NaN for a row with none: the mean local
    AUROC over the labels that have both classes (in the test set, or in a resample of it)."""
    rows = np.atleast_2d(np.asarray(values, np.float64))
    return np.array([row[~np.isnan(row)].mean() if not np.isnan(row).all() else math.nan for row in rows])


def image_weights(n, n_boot, rng):
    """(n_boot, n): how many times each of n test images is drawn in each resample with replacement."""
    idx = rng.integers(0, n, (n_boot, n))  # (R, N): the images of each resample
    return np.bincount((np.arange(n_boot)[:, None] * n + idx).ravel(), minlength=n_boot * n).reshape(n_boot, n)


def interval(samples):
    """The 95% percentile interval of bootstrap samples, as [low, high]; NaN where no resample defines the score."""
    samples = np.asarray(samples, np.float64)
    if not np.isfinite(samples).any():
        return [math.nan, math.nan]
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def p_value(d):
    """Two-sided bootstrap p-value of resampled differences d: twice the share of resamples on the smaller side of
    0 (NaN where no resample defines the difference). What it is and is not: this file's docstring."""
    d = np.asarray(d, np.float64)
    d = d[np.isfinite(d)]
    if not len(d):
        return math.nan
    return float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))


def paired_difference(point_a, point_b, samples_a, samples_b):
    """b - a with its 95% interval and two-sided bootstrap p-value, from resamples shared by a and b (paired)."""
    d = samples_b - samples_a
    return dict(difference=float(point_b - point_a), ci=interval(d), p_value=p_value(d), resamples=len(d))


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
    with warnings.catch_warnings():  # a draw whose seeds all leave a score undefined is NaN, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(samples[seeds, np.arange(R)[:, None]], 1)  # (R, S) -> (R,)


def scores(prediction, weights, groups=None, located=None):
    """
    Every score of one model under each row of image weights (R, N): {name: (R,)}; weights of ones (1, N) give the
    scores on the test set itself (evaluate.summary computes those the plain way, and agrees to the bit). 'per
    label' is AUROC per local label (R, L), 'mean local' their mean over the labels defined in that resample, a
    group's name the mean over its labels (groups: {name: [label index]}), 'normal/abnormal' the global AUROC; with
    located = (rows, in_box, hit) per image that has boxes (attention_maps.localization_score), 'attention in box'
    and 'pointing game' are their weighted means.
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
