"""The synthetic default (synthetic.py): the same bytes for a seed, each finding inside its box, and the point of
the set, fine findings that vanish at 28 x 28 while coarse ones stay."""

import csv
import os

import numpy as np
import pytest
import torch

from machinery import layouts, synthetic
from mlcak import simulate_low_resolution


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


def test_fine_findings_vanish_at_28_subtle_ones_are_attenuated_and_coarse_ones_stay():
    # the point of the synthetic set: what a finding changes in the image, seen at 224 and after 28 x 28
    assert synthetic.COARSE | synthetic.SUBTLE | synthetic.FINE == set(layouts.LOCAL_LABELS)
    assert len(synthetic.COARSE) + len(synthetic.SUBTLE) + len(synthetic.FINE) == 22 and len(synthetic.SUBTLE) == 7
    low = lambda image: simulate_low_resolution(torch.from_numpy(image)[None, None], 28)[0, 0].numpy()
    for label in layouts.LOCAL_LABELS:
        for seed in (0, 1):
            plain, _ = synthetic.synthetic_chest(np.random.default_rng(seed), 224, 224, [])
            drawn, _ = synthetic.synthetic_chest(np.random.default_rng(seed), 224, 224, [label])
            kept = np.abs(low(drawn) - low(plain)).sum() / np.abs(drawn - plain).sum()
            expected = kept > 0.9 if label in synthetic.COARSE else 0.4 < kept < 0.7 if label in synthetic.SUBTLE else kept < 0.5
            assert expected, (label, seed, kept)


def test_synthetic_test_labels_and_boxes_agree(tmp_path):
    root = synthetic.make_synthetic(str(tmp_path / "s"), n_train=2, n_test=20, seed=1, workers=1, verbose=False)
    test = layouts.load_source(root, "test")
    boxed = np.zeros_like(test.local)
    boxed[test.boxes[:, 0].astype(int), test.boxes[:, 1].astype(int)] = 1
    np.testing.assert_array_equal(boxed, test.local)
    assert 0 < test.abnormal.sum() < 20
