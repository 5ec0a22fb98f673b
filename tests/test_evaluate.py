import math

import numpy as np
import pytest

from evaluate import auroc, format_table, metrics


def brute_force_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_a_count_over_all_pairs_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 10, 200) / 10.0  # many ties
    assert auroc(y, s) == pytest.approx(brute_force_auroc(y, s), abs=1e-12)


def test_auroc_hand_worked_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    # positives 0.8, 0.4; negatives 0.6, 0.4, 0.2: pairs won 3 + (1 tie -> 0.5) + 1 = 4.5 of 6
    assert auroc([1, 0, 1, 0, 0], [0.8, 0.6, 0.4, 0.4, 0.2]) == 0.75


def test_auroc_is_nan_for_one_class():
    assert math.isnan(auroc([0, 0, 0], [0.1, 0.5, 0.9]))
    assert math.isnan(auroc([1, 1], [0.1, 0.5]))


def test_mean_is_over_defined_labels_with_their_count():
    y_local = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.1, 0.3], [0.8, 0.2, 0.4], [0.2, 0.3, 0.1]])
    m = metrics(scores, np.array([0.9, 0.1, 0.8, 0.4]), y_local, np.array([1, 0, 1, 0]), ["a", "b", "c"])
    assert m["per_label"]["a"] == {"auroc": 1.0, "positives": 2, "negatives": 2}
    assert math.isnan(m["per_label"]["b"]["auroc"]) and m["per_label"]["b"]["positives"] == 0
    assert m["per_label"]["c"]["auroc"] == 0.25
    assert m["labels_defined"] == 2 and m["mean_local_auroc"] == pytest.approx(0.625)
    assert m["normal_abnormal_auroc"] == 1.0
    table = format_table([dict(m, name="teacher@224")])
    assert "n/a" in table and "(2/3 labels)" in table and "0.625" in table
