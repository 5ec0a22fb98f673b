import math

import numpy as np
import pytest

import evaluate
from evaluate import summary
from machinery.attention_maps import attention_maps, box_mask, colorize, localization, pick_rows, write_figures
from machinery.bootstrap import auroc_rows, image_weights, interval, paired_difference, scores
from machinery.tables import format_table


def auroc(y, s):  # the bootstrap's weighted AUROC, once per image; evaluate.auroc is held to it below
    return float(auroc_rows(y, s)[0])


def bootstrap(predictions, n_boot=1000, seed=0):
    """Each model's scores under n_boot resamples of the test images, the same resamples for every model."""
    weights = image_weights(len(predictions[0][3]), n_boot, np.random.default_rng(seed))
    return [scores(p, weights) for p in predictions]


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


@pytest.mark.parametrize("seed", range(5))
def test_the_plain_auroc_and_summary_equal_the_bootstrap_versions_to_the_bit(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (300, 4))
    s = np.round(rng.random((300, 4)), 2)  # ties
    for k in range(4):
        assert evaluate.auroc(y[:, k], s[:, k]) == auroc(y[:, k], s[:, k]) == pytest.approx(brute_force_auroc(y[:, k], s[:, k]))
        assert evaluate.auroc(y[:, k], s[:, k]) == auroc(y[:, k], s[:, k])  # bit for bit
    y[:, 3] = 0  # a label with one class
    prediction = (s, s[:, 0], y, y[:, 0])
    point = scores(prediction, np.ones((1, 300)))
    plain = summary(prediction, list("abcd"))
    assert plain["mean_local_auroc"] == point["mean local"][0] and plain["labels_defined"] == 3
    assert plain["normal_abnormal_auroc"] == point["normal/abnormal"][0] and math.isnan(plain["per_label"]["d"]["auroc"])


def test_auroc_is_nan_for_one_class():
    assert math.isnan(auroc([0, 0, 0], [0.1, 0.5, 0.9])) and math.isnan(evaluate.auroc([0, 0, 0], [0.1, 0.5, 0.9]))
    assert math.isnan(auroc([1, 1], [0.1, 0.5])) and math.isnan(evaluate.auroc([1, 1], [0.1, 0.5]))


def test_mean_is_over_defined_labels_with_their_count():
    y_local = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
    local = np.array([[0.9, 0.1, 0.2], [0.1, 0.1, 0.3], [0.8, 0.2, 0.4], [0.2, 0.3, 0.1]])
    m = summary((local, np.array([0.9, 0.1, 0.8, 0.4]), y_local, np.array([1, 0, 1, 0])), ["a", "b", "c"])
    assert m["per_label"]["a"] == {"auroc": 1.0, "positives": 2, "negatives": 2}
    assert math.isnan(m["per_label"]["b"]["auroc"]) and m["per_label"]["b"]["positives"] == 0
    assert m["per_label"]["c"]["auroc"] == 0.25
    assert m["labels_defined"] == 2 and m["mean_local_auroc"] == pytest.approx(0.625)
    assert m["normal_abnormal_auroc"] == 1.0
    table = format_table([dict(m, name="teacher@224")])
    assert "n/a" in table and "(2/3 labels)" in table and "0.625" in table


def predictions(local_scores, y_local, abnormal_scores, y_abnormal):
    return (np.asarray(local_scores, float), np.asarray(abnormal_scores, float), np.asarray(y_local), np.asarray(y_abnormal))


def test_bootstrap_of_a_perfect_score_gives_one_with_interval_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3))
    y_abn = y.any(1).astype(int)
    (b,) = bootstrap([predictions(y + 0.1 * rng.random(y.shape), y, y_abn, y_abn)], n_boot=200)
    assert interval(b["mean local"]) == [1.0, 1.0] and interval(b["normal/abnormal"]) == [1.0, 1.0]


def test_bootstrap_interval_of_random_scores_covers_one_half():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (300, 4))
    (b,) = bootstrap([predictions(rng.random(y.shape), y, rng.random(300), y[:, 0])], n_boot=500)
    low, high = interval(b["mean local"])
    assert low < 0.5 < high and high - low < 0.15
    low, high = interval(b["normal/abnormal"])
    assert low < 0.5 < high


def test_bootstrap_resamples_agree_with_auroc_on_each_resample():
    rng = np.random.default_rng(2)
    y, s = rng.integers(0, 2, (50, 2)), rng.integers(0, 5, (50, 2))  # ties on purpose
    (b,) = bootstrap([predictions(s, y, s[:, 0], y[:, 0])], n_boot=5, seed=3)
    idx = np.random.default_rng(3).integers(0, 50, (5, 50))
    for r in range(5):
        expected = np.nanmean([auroc(y[idx[r], k], s[idx[r], k]) for k in range(2)])
        assert b["mean local"][r] == pytest.approx(expected)


def test_paired_bootstrap_of_a_model_against_itself_is_zero():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (100, 2))
    p = predictions(rng.random(y.shape), y, rng.random(100), y[:, 0])
    a, b = bootstrap([p, p], n_boot=100)
    d = paired_difference(0.7, 0.7, a["mean local"], b["mean local"])
    assert d == {"difference": 0.0, "ci": [0.0, 0.0], "p_value": 1.0, "resamples": 100}


def test_paired_difference_detects_a_clearly_better_model():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (300, 2))
    good = predictions(y + rng.normal(0, 0.5, y.shape), y, y[:, 0] + rng.normal(0, 0.5, 300), y[:, 0])
    bad = predictions(rng.random(y.shape), y, rng.random(300), y[:, 0])
    a, b = bootstrap([bad, good], n_boot=300)
    d = paired_difference(0.5, 0.84, a["mean local"], b["mean local"])
    assert d["ci"][0] > 0 and d["p_value"] < 0.01


def test_attention_in_box_and_pointing_game_on_hand_made_maps():
    # 4 x 4 images; image 0: all mass in one pixel inside the box; image 1: uniform, box of 4 pixels
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 1] = 1.0
    maps[1] = 1 / 16
    masks = [box_mask([[0, 1, 1, 2, 2]], 4), box_mask([[0, 2, 2, 4, 4]], 4)]
    assert masks[0].sum() == 1 and masks[1].sum() == 4
    result = localization(maps, masks)
    # in box: (1 + 4/16) / 2; pointing: image 0 hits, image 1's argmax is pixel (0, 0), outside; chance (1/16 + 4/16) / 2
    assert {k: result[k] for k in ("attention_in_box", "pointing_game", "chance", "n_images")} == \
        {"attention_in_box": 0.625, "pointing_game": 0.5, "chance": 0.15625, "n_images": 2}
    assert result["in_box"].tolist() == [1.0, 0.25] and result["hit"].tolist() == [1.0, 0.0]  # per image, for intervals


def test_colorize_runs_dark_to_bright():
    rgb = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    assert rgb[0, 0].sum() < rgb[0, 1].sum() < rgb[0, 2].sum()


def test_map_figures_have_one_panel_per_checkpoint_plus_the_input(tmp_path):
    import torch

    import data
    from machinery import layouts, synthetic
    from vit import VisionTransformer, ViTConfig

    root = synthetic.make_synthetic(str(tmp_path / "syn"), n_train=2, n_test=4, seed=2, workers=1, verbose=False)
    test = data.XrayDataset(data.build_cache(layouts.load_source(root, "test"), 64, str(tmp_path / "cache"), workers=1,
                                             verbose=False))
    model = VisionTransformer(ViTConfig(img_size=64, patch_size=16, embed_dim=24, depth=2, num_heads=2)).eval()
    loaded = [(model, dict(res=64, norm=[0.5, 0.25], role="teacher", kd=False)),
              (model, dict(res=16, norm=[0.5, 0.25], role="mlcak", kd=True))]
    rows = pick_rows(test, count=3)
    assert len(rows) == 3 and len(test.boxes(rows[0])) >= len(test.boxes(rows[-1]))
    assert write_figures(str(tmp_path / "maps"), test, loaded, rows, "cpu") == 3
    from PIL import Image
    overview = Image.open(tmp_path / "maps" / "overview.png")
    assert overview.size == (3 * 64, 3 * (64 + 14))
    assert Image.open(tmp_path / "maps" / f"{test.image_ids[rows[0]]}.png").size == (3 * 64, 64 + 14)
    maps = attention_maps(model, test, rows, 64, (0.5, 0.25), "cpu")
    assert maps.shape == (3, 4, 4) and torch.allclose(maps.sum((1, 2)), torch.ones(3))


def seed_results(gain, seeds=4, n=200, noises=None):
    """evaluate_checkpoints-like results of baseline and mlcak over seeds, all scored on one test set with one set of
    image resamples (as evaluate_checkpoints shares them); mlcak's scores are `gain` less noisy (or: each model
    named in `noises` with its noise)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (n, 3))
    weights = image_weights(n, 300, rng)
    out = []
    for s in range(seeds):
        for name, noise in (noises or {"baseline@28": 3.0, "mlcak@28": 3.0 * (1 - gain)}).items():  # 3: AUROC ~0.83
            p = y + noise * rng.random(y.shape)
            prediction = predictions(p, y, p.max(1), y.any(1).astype(int))
            point = scores(prediction, np.ones((1, n)), {"pair": [0, 1]})
            out.append(dict(name=name, seed=s, per_label=[0, 1, 2], n_images=n, checkpoint=f"{name}-{s}.pt",
                            _samples=scores(prediction, weights, {"pair": [0, 1]}),
                            scores={k: float(v[0]) for k, v in point.items() if k != "per label"}))
    return out


def test_seed_report_pools_seeds_and_finds_a_real_gain_but_not_a_null_one():
    from machinery.tables import seed_report
    report = seed_report(seed_results(gain=0.5))
    assert "| mlcak@28 | 4 |" in report and "| baseline@28 | 4 |" in report and report.count("| pooled |") == 1
    assert report.startswith("200 test images, 300 bootstrap resamples")
    pooled = report.split("| pooled | ")[1].split(" | ")
    assert pooled[0].startswith("**+") and "p < 0.007" in pooled[0]  # no resample of 300 crosses 0: p below 2/300
    null = seed_report(seed_results(gain=0.0)).split("| pooled | ")[1].split(" | ")[0]
    assert float(null.split("p = ")[1].split()[0].rstrip("|")) > 0.05


def test_seed_report_tests_the_premise_teacher_above_baselines_and_baselines_falling_with_resolution():
    from machinery.tables import seed_report
    noises = {"teacher@224": 1.0, "baseline@112": 2.0, "baseline@56": 3.0, "baseline@28": 3.0, "mlcak@28": 3.0}
    report = seed_report(seed_results(0.0, noises=noises))
    cells = [line[2:].split(" | ") for line in report.split("\n") if line.startswith("| ")]
    rows = {c[0]: c[2] for c in cells if " - " in c[0]}  # difference, seeds, mean local, ...
    assert list(rows) == ["teacher@224 - baseline@112", "teacher@224 - baseline@56", "teacher@224 - baseline@28",
                          "baseline@112 - baseline@56", "baseline@56 - baseline@28"]
    for pair in ("teacher@224 - baseline@112", "teacher@224 - baseline@28", "baseline@112 - baseline@56"):
        assert rows[pair].startswith("+") and "p < 0.007" in rows[pair], (pair, rows[pair])
    same = rows["baseline@56 - baseline@28"]  # equally noisy: the test must not find a difference
    assert float(same.split("p = ")[1]) > 0.05, same
    assert "The premise" not in seed_report(seed_results(0.0))  # baseline and mlcak alone: nothing to test


def test_seed_report_names_a_seed_given_twice():
    import data
    from machinery.tables import seed_report
    results = seed_results(gain=0.0, seeds=2)
    results[2]["seed"] = 0  # a copy of seed 0's baseline under another file name
    with pytest.raises(data.DataError, match="baseline@28-0.pt and baseline@28-1.pt are both baseline@28 of seed 0"):
        seed_report(results)


def test_seed_report_refuses_to_pool_runs_of_other_recipes_naming_the_flag():
    import data
    from machinery.tables import seed_report
    results = seed_results(gain=0.0, seeds=2)
    for r in results:
        r["recipe"] = dict(model="vit_cpu", epochs=30, train_cache="vindr-train-224-aaaa", gamma=1000.0, seed=r["seed"])
    assert "| pooled |" in seed_report(results)  # the seed differs: that is what seeds are
    results[2]["recipe"] = dict(results[2]["recipe"], model="vit_tiny")  # seed 1's baseline, another model
    with pytest.raises(data.DataError, match=r"baseline@28-0.pt \(baseline@28\) and baseline@28-1.pt \(baseline@28\) were "
                                             r"trained with other --model \(vit_cpu, vit_tiny\)"):
        seed_report(results)
    results[2]["recipe"] = dict(results[2]["recipe"], model="vit_cpu", train_cache="vindr-train-224-bbbb")
    with pytest.raises(data.DataError, match=r"other training data \(their caches differ\)"):
        seed_report(results)


def test_seed_report_pools_a_teacher_trained_on_its_own_data_but_not_two_teachers_of_other_data():
    import data
    from machinery.tables import seed_report
    results = seed_results(gain=0.0, seeds=2)
    for r in results:
        r["recipe"] = dict(model="vit_cpu", epochs=30, train_cache="vindr-train-224-aaaa", gamma=1000.0, seed=r["seed"])
    teachers = [dict(r, name="teacher@224", checkpoint=f"teacher-{r['seed']}.pt",
                     recipe=dict(r["recipe"], train_cache="vindr-train-224-cccc", epochs=60))
                for r in results if r["name"] == "baseline@28"]
    report = seed_report(teachers + results)  # a larger archive and a longer schedule than the students'
    assert "| teacher@224 | 2 |" in report and "| pooled |" in report
    teachers[1]["recipe"] = dict(teachers[1]["recipe"], train_cache="vindr-train-224-dddd")
    with pytest.raises(data.DataError, match=r"teacher-0.pt \(teacher@224\) and teacher-1.pt \(teacher@224\) were "
                                             r"trained with other training data"):
        seed_report(teachers + results)


def test_seed_report_says_when_no_seed_has_both_models():
    from machinery.tables import seed_report
    results = [r for r in seed_results(gain=0.0, seeds=2) if (r["name"], r["seed"]) in (("mlcak@28", 0), ("baseline@28", 1))]
    report = seed_report(results)
    assert "mlcak@28 - baseline@28: no seed has both models (mlcak of seeds [0], baseline of seeds [1])" in report
    assert "| pooled |" not in report
