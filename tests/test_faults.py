"""Nothing silently wrong: each bad input or failed run ends in one line and the right exit code, and nothing
untrained, NaN or half-written is saved or reused (train.cli and evaluate.main, in this process)."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import data
import layouts
import evaluate
import train
from helpers import class_folders
from vit import VARIANTS, CheckpointError, ViTConfig, VisionTransformer, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A class-folder set of 36 training and 36 test images, and the flags of a short run on it."""
    tmp = tmp_path_factory.mktemp("faults")
    root = class_folders(tmp / "cls")
    flags = ["--data", root, "--cache-dir", str(tmp / "cache"), "--img-size", "64", "--res", "32", "--epochs", "1",
             "--batch-size", "4", "--bootstrap", "0"]
    return tmp, flags


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of train.py with these flags."""
    try:
        code = train.cli(list(argv))
    except SystemExit as exit:  # the parser's errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    return err.strip().count("\n") == 0 and "Traceback" not in err and "\x1b[" not in err


def checkpoints(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".pt")]


@pytest.mark.parametrize("flags, message", [
    (["--res", "0"], "--res must be between 8"),
    (["--gamma", "-1"], "--alpha, --beta and --gamma must be 0 or more"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--img-size", "100"], "--img-size must be a multiple of vit_cpu's patch size 32"),
    (["--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such file or folder"),
    (["--teacher", "/no/such/teacher.pt"], "--teacher /no/such/teacher.pt: no such file"),
    (["--model", "vit_huge"], "invalid choice: 'vit_huge'"),
    (["--device", "cuda:7"], "--device cuda:7:"),
    (["--device", "nonsense"], "--device nonsense: not a device name"),
])
def test_bad_flags_give_one_line_and_exit_2_before_any_work(capsys, flags, message):
    if flags[0] == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    code, out, err = cli(capsys, *flags)
    assert code == 2 and one_line(err) and message in err and out == ""


def test_an_unwritable_out_folder_is_named_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, out, err = cli(capsys, "--out", str(tmp_path / "file" / "runs"))
    assert code == 2 and one_line(err) and f"--out {tmp_path / 'file' / 'runs'}: cannot write there" in err


def test_evaluate_names_an_unwritable_maps_folder_and_a_missing_device(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for flags, message in ((["--maps", str(tmp_path / "file" / "maps")], f"--maps {tmp_path / 'file' / 'maps'}: cannot write"),
                           (["--device", "cuda:7"], "--device cuda:7:")):
        if flags[0] == "--device" and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(SystemExit) as exit:
            evaluate.main(["/no/such/best.pt", *flags])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and one_line(err) and message in err


def test_a_nan_loss_stops_the_run_with_one_line_and_saves_nothing(tiny, tmp_path, capsys):
    tmp, flags = tiny
    code, out, err = cli(capsys, *flags, "--out", str(tmp_path), "--lr", "1e6", "--no-kd", "--epochs", "3")
    assert code == 1 and one_line(err) and "baseline: the loss is not finite at step" in err and "cls_local" in err
    assert checkpoints(tmp_path) == []  # not one NaN checkpoint written, so none can be reused


def test_non_finite_weights_are_never_written_nor_reused(tmp_path):
    model = VisionTransformer(ViTConfig(img_size=64, num_local=2, **VARIANTS["vit_cpu"]))
    with torch.no_grad():
        model.head_local.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not written: 1 tensors hold NaN"):
        save_checkpoint(str(tmp_path / "last.pt"), model, epoch=1)
    torch.save(dict(model=model.state_dict(), vit_config={}, epoch=1), tmp_path / "last.pt")  # written by other means
    assert not train.finished(str(tmp_path), 1)  # trained again, not reused


def test_a_run_of_zero_steps_is_refused_not_saved_as_finished(tiny, tmp_path, capsys):
    tmp, flags = tiny
    code, out, err = cli(capsys, *flags, "--out", str(tmp_path), "--batch-size", "64", "--no-kd")
    assert code == 1 and one_line(err) and "--batch-size 64 is more than the 30 training images" in err
    assert checkpoints(tmp_path) == []


def test_without_validation_the_last_epoch_is_kept_and_said(tiny, tmp_path, capsys):
    tmp, flags = tiny
    code, out, err = cli(capsys, *flags, "--out", str(tmp_path), "--val-fraction", "0", "--no-kd", "--epochs", "2")
    assert code == 0, err
    assert "data: no validation image (--val-fraction 0): the model of the last epoch is kept (best = last)" in out
    best = torch.load(next(p for p in checkpoints(tmp_path) if p.endswith("best.pt")), weights_only=True)
    assert best["epoch"] == 2


def teacher_file(path, labels, img_size=64, model="vit_cpu"):
    """A teacher checkpoint as train.py writes it (untrained: only its fit is checked)."""
    save_checkpoint(str(path), VisionTransformer(ViTConfig(img_size=img_size, num_local=len(labels), **VARIANTS[model])),
                    role="teacher", res=img_size, kd=False, norm=[0.5, 0.25], label_names=labels, epoch=1)
    return str(path)


@pytest.mark.parametrize("labels, img_size, model, message", [
    (["COVID", "TB"], 64, "vit_cpu", "trained on other labels (label 2 is 'TB', here 'PNEUMONIA')"),
    (["COVID"], 64, "vit_cpu", "trained on other labels (it has 1 labels, this data 2)"),
    (["COVID", "PNEUMONIA"], 128, "vit_cpu", "sees 128 px in 17 tokens, the students 64 px in 5 tokens"),
    (["COVID", "PNEUMONIA"], 64, "vit_tiny", "sees 64 px in 17 tokens, the students 64 px in 5 tokens"),
])
def test_a_teacher_that_does_not_fit_is_named_before_training(tiny, tmp_path, capsys, labels, img_size, model, message):
    tmp, flags = tiny
    teacher = teacher_file(tmp_path / "teacher.pt", labels, img_size, model)
    code, out, err = cli(capsys, *flags, "--out", str(tmp_path / "runs"), "--teacher", teacher)
    assert code == 1 and one_line(err) and f"--teacher {teacher}: {message}" in err
    assert checkpoints(tmp_path / "runs") == []


@pytest.mark.parametrize("content", [os.urandom(300), b"just some text\n", "pickle"])
def test_a_teacher_or_init_file_that_is_not_a_checkpoint_is_one_line(tiny, tmp_path, capsys, content):
    tmp, flags = tiny
    path = tmp_path / "bad.pt"
    if content == "pickle":  # a full pickle: weights_only loading refuses it, with a long coloured message
        import argparse
        torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, path)
    else:
        path.write_bytes(content)
    for flag in ("--teacher", "--init"):
        code, out, err = cli(capsys, *flags, "--out", str(tmp_path / "runs"), flag, str(path))
        assert code == 1 and one_line(err), err
        assert str(path) in err and ("not a weights-only checkpoint" in err or flag == "--init")


def test_evaluation_names_the_first_label_that_differs_and_survives_a_read_only_folder(tiny, tmp_path, capsys):
    tmp, flags = tiny
    dataset = data.XrayDataset(data.build_cache(layouts.load_source(flags[1], "test"), 64, flags[3], verbose=False))
    other = teacher_file(tmp_path / "best.pt", ["COVID", "TB"])
    with pytest.raises(data.DataError, match="label 2 is 'TB', the test set's 'PNEUMONIA'"):
        evaluate.evaluate_checkpoints([other], dataset, n_boot=0)
    os.makedirs(tmp_path / "good" / "best.eval.json")  # the JSON cannot be written there, as in a read-only folder
    good = teacher_file(tmp_path / "good" / "best.pt", ["COVID", "PNEUMONIA"])
    results = evaluate.evaluate_checkpoints([good], dataset, n_boot=0)
    err = capsys.readouterr().err
    assert one_line(err) and f"cannot write {tmp_path / 'good' / 'best.eval.json'}" in err and "eval_json" not in results[0]
    assert 0 <= results[0]["mean_local_auroc"] <= 1


def test_ctrl_c_says_how_to_resume_instead_of_a_traceback(tiny, tmp_path):
    tmp, flags = tiny
    # a background job (pytest ... &) starts with Ctrl-C ignored, and its children inherit that: give the run the
    # default a user at the keyboard has, or the signal below would be ignored and the run go on to its end
    process = subprocess.Popen([sys.executable, "train.py", *flags, "--out", str(tmp_path), "--epochs", "50",
                                "--log-every", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("teacher epoch 2/50 step"):
            process.send_signal(signal.SIGINT)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err
    assert "interrupted: run the same command with --resume to continue from the last finished epoch" in err
