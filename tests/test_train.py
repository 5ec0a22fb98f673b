"""End to end: train.py and evaluate.py as a user runs them, on a tiny synthetic set, in subprocesses."""

import os
import re
import subprocess
import sys

import pytest
import torch

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return result


def table_row(output, start):
    line = next(line for line in output.splitlines() if line.startswith(start))
    return [float(v) for v in re.findall(r"\d\.\d{3}", line.split(")")[-1] if ")" in line else line)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    root = data.make_synthetic(str(tmp / "syn"), n_train=48, n_test=24, seed=3, workers=2, verbose=False)
    common = ["--data", root, "--out", str(tmp / "runs"), "--cache-dir", str(tmp / "cache"), "--epochs", "2",
              "--batch-size", "8", "--log-every", "2", "--res", "28"]
    first = run("train.py", *common)
    baseline = run("train.py", *common, "--no-kd")
    return tmp, first.stdout, baseline.stdout


def test_training_runs_teacher_then_student_and_prints_auroc(tiny):
    tmp, out, _ = tiny
    assert "teacher epoch 2/2" in out and "student epoch 2/2" in out
    assert re.search(r"kd_attn [0-9.e-]+ .*img/s, ETA", out)
    assert len(table_row(out, "mean local AUROC")) == 2  # teacher@224 and MLCAK student@28


def test_checkpoints_load_with_weights_only_and_hold_plain_values(tiny):
    tmp, _, _ = tiny
    paths = [os.path.join(d, f) for d, _, fs in os.walk(tmp / "runs") for f in fs if f.endswith(".pt")]
    assert len(paths) == 6  # best and last for teacher, student, baseline
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["role"] in ("teacher", "student", "baseline") and isinstance(ckpt["vit_config"], dict)
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


def test_second_run_reuses_the_teacher_and_shows_the_baseline(tiny):
    _, _, out = tiny
    assert "teacher epoch" not in out and "baseline epoch 2/2" in out
    assert len(table_row(out, "mean local AUROC")) == 3  # teacher, baseline, MLCAK student


def test_evaluate_reproduces_the_auroc_that_training_printed(tiny):
    tmp, _, out = tiny
    runs = sorted(os.listdir(tmp / "runs"))
    order = [next(r for r in runs if r.startswith(p)) for p in ("teacher", "student-28-baseline", "student-28-mlcak")]
    result = run("evaluate.py", *[str(tmp / "runs" / r / "best.pt") for r in order])
    for row in ("mean local AUROC", "normal/abnormal AUROC"):
        assert table_row(result.stdout, row) == table_row(out, row)
    assert os.path.isfile(tmp / "runs" / order[0] / "best.eval.json")


@pytest.mark.parametrize("flags, message", [
    (["--res", "0"], "--res must be between 8"),
    (["--res", "500"], "--res must be between 8"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such file or folder"),
    (["--teacher", "/no/such/teacher.pt"], "--teacher /no/such/teacher.pt: no such file"),
    (["--model", "vit_huge"], "invalid choice: 'vit_huge'"),
])
def test_bad_flags_give_one_clear_line_and_a_nonzero_exit(flags, message):
    result = run("train.py", *flags, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_evaluate_names_a_missing_checkpoint():
    result = run("evaluate.py", "/no/such/best.pt", check=False)
    assert result.returncode == 1 and "/no/such/best.pt: checkpoint not found" in result.stderr


def test_compare_writes_the_resolution_table_and_maps_reusing_finished_runs(tiny):
    tmp, _, _ = tiny
    out = run("train.py", "--data", str(tmp / "syn"), "--out", str(tmp / "runs"), "--cache-dir", str(tmp / "cache"),
              "--epochs", "2", "--batch-size", "8", "--res", "56", "28", "--compare", "--bootstrap", "200").stdout
    assert "teacher: reusing" in out and "baseline student@28: reusing" in out and "MLCAK student@28: reusing" not in out
    assert "mlcak student@28: reusing" in out and "baseline epoch 2/2" in out  # only the 56 students are new
    table = next(f for f in os.listdir(tmp / "runs") if f.startswith("table-") and f.endswith(".md"))
    text = open(tmp / "runs" / table).read()
    for row in ("| teacher@224 |", "| baseline student@56 |", "| MLCAK student@56 |", "| baseline student@28 |",
                "| MLCAK student@28 |", "| uniform map (chance) |"):
        assert row in text
    assert text.count("MLCAK - baseline:") == 2
    maps = tmp / "runs" / table.replace(".md", "-maps")
    assert len(os.listdir(maps)) == 7  # six images and the overview


def test_evaluate_writes_attention_maps_for_chosen_images(tiny):
    tmp, _, _ = tiny
    teacher = next(r for r in os.listdir(tmp / "runs") if r.startswith("teacher"))
    ckpt = str(tmp / "runs" / teacher / "best.pt")
    ids = data.XrayDataset(torch.load(ckpt, weights_only=True)["data"]["test_cache"]).image_ids[:2]
    out = run("evaluate.py", ckpt, "--maps", str(tmp / "maps"), "--map-ids", ",".join(ids), "--bootstrap", "100").stdout
    assert "wrote 2 figures" in out and sorted(os.listdir(tmp / "maps")) == sorted([f"{i}.png" for i in ids] + ["overview.png"])
    bad = run("evaluate.py", ckpt, "--maps", str(tmp / "maps"), "--map-ids", "nope", check=False)
    assert bad.returncode == 1 and "--map-ids: image nope is not in the test set" in bad.stderr
