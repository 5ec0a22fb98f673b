"""The synthetic default (synthetic.py): the same bytes for a seed, each finding inside its box, and the point of
the set, findings graded by what of them survives at 112, 56 and 28."""

import csv
import os

import numpy as np
import pytest

from machinery import layouts, synthetic


def test_synthetic_generator_is_byte_identical_for_a_seed(tmp_path):
    a = synthetic.make_synthetic(str(tmp_path / "a"), n_train=6, n_test=3, seed=7, workers=2, verbose=False)
    b = synthetic.make_synthetic(str(tmp_path / "b"), n_train=6, n_test=3, seed=7, workers=1, verbose=False)
    c = synthetic.make_synthetic(str(tmp_path / "c"), n_train=6, n_test=3, seed=8, workers=1, verbose=False)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len(files) == 6 + 3 + 4 + 2  # DICOMs, four CSVs, synthetic.json and label_groups.json
    for f in files:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    assert open(os.path.join(a, "annotations", "image_labels_test.csv")).read() != \
        open(os.path.join(c, "annotations", "image_labels_test.csv")).read()
    train = layouts.load_source(a, "train")
    assert len(train.image_ids) == 6 and {len(set(r["rad_id"] for r in csv.DictReader(
        open(os.path.join(a, "annotations", "image_labels_train.csv"))) if r["image_id"] == i)) for i in train.image_ids} == {3}


@pytest.mark.parametrize("label", sorted(set(layouts.LOCAL_LABELS) - {"Mediastinal shift"}))
def test_each_synthetic_finding_is_drawn_inside_its_box(label):
    h, w = 224, 208
    plain, _ = synthetic.synthetic_chest(np.random.default_rng(3), h, w, [])
    drawn, boxes = synthetic.synthetic_chest(np.random.default_rng(3), h, w, [label])
    (name, x0, y0, x1, y1), = boxes
    assert name == label
    diff = np.abs(drawn.astype(np.float64) - plain)
    inside = diff[int(y0 * h):int(np.ceil(y1 * h)) + 1, int(x0 * w):int(np.ceil(x1 * w)) + 1].sum()
    assert diff.sum() > 0.5 and inside >= 0.8 * diff.sum(), (inside, diff.sum())


@pytest.mark.parametrize("label", layouts.LOCAL_LABELS)
def test_each_finding_keeps_at_112_56_and_28_what_its_tier_says(label):
    # the point of the synthetic set: coarse findings survive every resolution, subtle ones fall from 112 to 28,
    # fine ones are there at 112 and mostly gone by 56 (synthetic.TIERS, the one definition of the tiers)
    kept = synthetic.survival(label)
    assert synthetic.in_tier(synthetic.tier(label), kept), (label, synthetic.tier(label), kept)


def test_the_tiers_cover_the_22_labels_once_and_their_rules_can_fail():
    assert synthetic.COARSE | synthetic.SUBTLE | synthetic.FINE == set(layouts.LOCAL_LABELS)
    assert len(synthetic.COARSE) + len(synthetic.SUBTLE) + len(synthetic.FINE) == 22 and len(synthetic.SUBTLE) == 7
    assert not synthetic.in_tier("fine", {112: 0.3, 56: 0.1, 28: 0.05})  # erased before 112: not fine, gone
    assert not synthetic.in_tier("subtle", {112: 0.9, 56: 0.6, 28: 0.65})  # not falling from 56 to 28
    assert not synthetic.in_tier("coarse", {112: 1.0, 56: 0.95, 28: 0.6})
    assert synthetic.in_tier("subtle", {112: 0.9, 56: 0.7, 28: 0.5}) and synthetic.in_tier("fine", {112: 0.7, 56: 0.4, 28: 0.2})


def test_synthetic_test_labels_and_boxes_agree(tmp_path):
    root = synthetic.make_synthetic(str(tmp_path / "s"), n_train=2, n_test=20, seed=1, workers=1, verbose=False)
    test = layouts.load_source(root, "test")
    boxed = np.zeros_like(test.local)
    boxed[test.boxes[:, 0].astype(int), test.boxes[:, 1].astype(int)] = 1
    np.testing.assert_array_equal(boxed, test.local)
    assert 0 < test.abnormal.sum() < 20
