"""Nothing silently wrong: each bad input or failed run ends in one line and the right exit code, and nothing
untrained, NaN or half-written is saved or reused (train.cli and evaluate.cli, in this process)."""

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import evaluate
import train
from helpers import call, class_folders, entries, write_image, write_rows
from machinery import layouts, runs
from machinery.cache import cache_folder
from machinery.runtime import CheckpointError, Lock, save_checkpoint
from vit import VARIANTS, VisionTransformer, ViTConfig

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
    return call(capsys, train.cli, *argv)


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
    torch.save(dict(entries(), model=model.state_dict(), vit_config={}), tmp_path / "last.pt")  # written by other means
    assert not runs.finished(str(tmp_path), 1)  # trained again, not reused


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
                    **entries("teacher", img_size, labels))
    return str(path)


@pytest.mark.parametrize("labels, img_size, model, message", [
    (["COVID", "TB"], 64, "vit_cpu", "trained on other labels (label 2 is 'TB', this data's 'PNEUMONIA')"),
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
        assert str(path) in err and ("not a plain-tensor checkpoint" in err or flag == "--init")


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


def test_a_student_given_as_teacher_is_refused(tiny, tmp_path, capsys):
    tmp, flags = tiny
    student = str(tmp_path / "student.pt")
    save_checkpoint(student, VisionTransformer(ViTConfig(img_size=64, num_local=2, **VARIANTS["vit_cpu"])),
                    **entries("baseline", 32))
    code, out, err = cli(capsys, *flags, "--out", str(tmp_path / "runs"), "--teacher", student)
    assert code == 1 and one_line(err) and f"--teacher {student}: a baseline model that sees 32 px images, not a teacher" in err
    assert checkpoints(tmp_path / "runs") == []


def test_a_pickle_that_would_run_code_names_what_was_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    code = evaluate.cli([str(tmp_path / "evil.pt")])
    out, err = capsys.readouterr()
    assert code == 1 and one_line(err) and "this must never run" not in out
    assert f"{tmp_path / 'evil.pt'}: not a plain-tensor checkpoint: it holds a pickled posix.system, which was refused" in err


def test_an_init_checkpoint_that_cannot_load_is_one_line(tiny, tmp_path, capsys):
    tmp, flags = tiny
    state = VisionTransformer(ViTConfig(img_size=64, num_local=2, **VARIANTS["vit_cpu"])).state_dict()
    state["pos_embed"] = torch.randn(1, 11, 96)  # ten patch slots: no square grid
    torch.save(state, tmp_path / "odd.pth")
    code, out, err = cli(capsys, *flags, "--out", str(tmp_path / "runs"), "--no-kd", "--init", str(tmp_path / "odd.pth"))
    assert code == 1 and one_line(err) and "pos_embed holds 10 patch positions" in err


def test_repeated_resolutions_are_trained_and_shown_once(capsys):
    args = train.parse_args(["--res", "28", "56", "28", "--compare"])
    assert args.res == [28, 56] and "--res 28 is given 2 times: its models are trained and shown once" in capsys.readouterr().out


def run_folders(*flags, device="cpu"):
    """The run folders RunFolders names for these flags on a fixed dataset: (teacher, baseline@28, mlcak@28)."""
    args = train.parse_args(["--out", "/tmp", *flags])
    folders = runs.RunFolders(args, dict(train_cache="/c/vindr-train-224-a", test_cache="/c/vindr-test-224-b"),
                               torch.device(device))
    return folders.teacher, folders.student("baseline", 28), folders.student("mlcak", 28)


CHANGED = {"model": ["--model", "vit_tiny"], "img_size": ["--img-size", "256"], "epochs": ["--epochs", "31"],
           "batch_size": ["--batch-size", "16"], "lr": ["--lr", "2e-3"], "weight_decay": ["--weight-decay", "0.1"],
           "warmup": ["--warmup", "0.2"], "seed": ["--seed", "1"], "readers": ["--readers", "any"],
           "val_fraction": ["--val-fraction", "0.2"], "amp": ["--amp"], "compile": ["--compile"],
           "init_norm": ["--init-norm", "inception"]}


@pytest.mark.parametrize("flag", sorted(CHANGED))
def test_a_flag_that_changes_the_numbers_names_a_new_run_folder(flag, tmp_path):
    base = ["--init", str(tmp_path / "w.pth")] if flag == "init_norm" else []
    if base:
        torch.save({}, tmp_path / "w.pth")
    before, after = run_folders(*base), run_folders(*base, *CHANGED[flag])
    assert all(a != b for a, b in zip(before, after)), flag


def test_the_other_flags_that_change_numbers_name_new_folders_too(tmp_path):
    same = run_folders()
    for flags in (["--alpha", "2"], ["--beta", "2"], ["--gamma", "10"]):  # the mlcak student's folder alone
        teacher, baseline, mlcak = run_folders(*flags)
        assert (teacher, baseline) == same[:2] and mlcak != same[2], flags
    torch.save({}, tmp_path / "t.pt")
    assert run_folders("--teacher", str(tmp_path / "t.pt"))[2] != same[2]
    torch.save({}, tmp_path / "w.pth")
    assert run_folders("--init", str(tmp_path / "w.pth"))[0] != same[0]
    assert run_folders(device="cuda")[0] != same[0] and run_folders("--no-tf32", device="cuda")[0] == same[0]  # TF32 on CUDA
    for flags in (["--workers", "2"], ["--log-every", "5"], ["--bootstrap", "10"], ["--resume"], ["--rebuild-cache"],
                  ["--no-tf32"], ["--cache-dir", str(tmp_path)]):  # cannot change a number: the same folders
        assert run_folders(*flags) == same, flags
    # --data, --uncertain, --views and --boxes change the labels or the images, so the cache's name (in the recipe)
    write_image(tmp_path / "a.png", 0, True)
    write_rows(tmp_path / "set.csv", ["path", "Nodule", "split"], [["a.png", -1, "train"], ["a.png", 1, "test"]])
    zeros, ones = (layouts.load_source(str(tmp_path / "set.csv"), "train", uncertain=u) for u in ("zeros", "ones"))
    assert cache_folder(zeros) != cache_folder(ones)



def test_every_flag_is_either_in_the_run_folder_name_or_said_not_to_change_the_numbers():
    every = {a.dest for a in train.build_parser()._actions} - {"help"}
    assert every == set(runs.FLAGS_THAT_MATTER) | set(runs.FLAGS_THAT_DO_NOT) | set(runs.FLAGS_THAT_CHOOSE_RUNS)
    described = " ".join(train.build_parser().description.split())
    for flag in runs.FLAGS_THAT_DO_NOT:
        assert f"--{flag.replace('_', '-')}" in described, flag


def start(flags, out, *extra, **kw):
    """train.py in a subprocess with the default SIGINT handler a user at the keyboard has (see the Ctrl-C test)."""
    return subprocess.Popen([sys.executable, "train.py", *flags, "--out", str(out), "--log-every", "1", *extra], cwd=ROOT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **dict(dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE), **kw))


def test_sigterm_says_how_to_resume_and_resume_under_other_flags_names_the_interrupted_run(tiny, tmp_path, capsys):
    tmp, flags = tiny
    process, seen = start(flags, tmp_path, "--epochs", "6"), ""
    for line in process.stdout:
        seen += line
        if line.startswith("teacher epoch 2/6 step"):
            process.send_signal(signal.SIGTERM)  # what timeout, Slurm and Kubernetes send
            break
    rest, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err
    assert "terminated: run the same command with --resume to continue from the last finished epoch" in err
    interrupted = next(p for p in checkpoints(tmp_path) if p.endswith("last.pt"))
    # the state written before the signal, intact: epoch 1, or a later one where the run went on while the signal was
    # on its way (a busy machine)
    done = torch.load(interrupted, weights_only=True)["epoch"]
    assert 1 <= done < 6 and f"teacher epoch {done}: val" in seen + rest
    code, out, err = cli(capsys, *flags, "--out", str(tmp_path), "--epochs", "6", "--resume", "--lr", "2e-3")
    assert code == 0, err
    assert "teacher@64: --resume: no interrupted run of these settings" in out
    assert (f"interrupted runs of this data under other settings: {os.path.dirname(interrupted)} (epoch {done}/6; it had "
            "--lr 0.001)") in out
    code, out, err = cli(capsys, *flags, "--out", str(tmp_path), "--epochs", "6", "--resume")
    assert code == 0 and "teacher: resuming" in out and f"after epoch {done}" in out


def test_a_full_disk_under_out_is_one_line_and_leaves_no_temporary_file(tiny, tmp_path, capsys):
    tmp, flags = tiny
    cli(capsys, *flags, "--out", str(tmp_path / "warm"), "--no-kd", "--epochs", "1")  # the caches, made beforehand
    # a file size limit stands in for a full disk: best.pt (2 MB) fits, last.pt (with AdamW's state, 6 MB) does not
    limit = lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2 ** 20,) * 2))
    result = subprocess.run([sys.executable, "train.py", *flags, "--out", str(tmp_path / "runs"), "--no-kd"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 1 and one_line(result.stderr), result.stderr
    assert "last.pt: not written (RuntimeError:" in result.stderr and "free on that disk" in result.stderr
    run = next(os.path.join(tmp_path / "runs", d) for d in os.listdir(tmp_path / "runs"))
    assert sorted(f for f in os.listdir(run) if not f.startswith(".")) == ["best.pt", "log.csv"]  # no temporary file left
    assert torch.load(os.path.join(run, "best.pt"), weights_only=True)["epoch"] == 1


def test_two_identical_runs_started_at_once_both_finish_with_intact_files(tiny, tmp_path):
    tmp, flags = tiny
    fresh = [f if f != str(tmp / "cache") else str(tmp_path / "cache") for f in flags]  # a cache of their own, to build
    source = layouts.load_sources(flags[1])["train"]
    logs = [tmp_path / f"out{k}.txt" for k in range(2)]
    # both started while the cache they will build is held (here, by the test), so that they meet whatever the load
    with Lock(os.path.join(cache_folder(source, 64, str(tmp_path / "cache")), ".lock"), "the test's hold"):
        runs = [start(fresh, tmp_path / "runs", stdout=open(log, "w")) for log in logs]
        while not all(log.exists() and "waiting for process" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in runs)
            time.sleep(0.2)
    results = [(p.wait(timeout=300), log.read_text(), p.stderr.read()) for p, log in zip(runs, logs)]
    for code, out, err in results:
        assert code == 0, out + err
    both = results[0][1] + results[1][1]
    assert "reusing" in both  # one waited for the other's run, then reused its work
    for path in checkpoints(tmp_path / "runs"):
        torch.load(path, weights_only=True)
    assert not [f for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp") or ".tmp." in f]


def test_evaluating_checkpoints_of_two_image_sizes_together_is_one_line(tiny, tmp_path):
    tmp, flags = tiny
    dataset = data.XrayDataset(data.build_cache(layouts.load_source(flags[1], "test"), 64, flags[3], verbose=False))
    small, large = (teacher_file(tmp_path / f"{s}.pt", ["COVID", "PNEUMONIA"], s) for s in (64, 128))
    with pytest.raises(data.DataError, match=r"128.pt: sees 128 px images, the test set was decoded at 64 px"):
        evaluate.evaluate_checkpoints([small, large], dataset, n_boot=0)


def test_a_test_set_of_abnormal_images_only_says_why_normal_abnormal_is_na_without_warnings(tiny, tmp_path, recwarn):
    tmp, flags = tiny
    dataset = data.XrayDataset(data.build_cache(layouts.load_source(flags[1], "test"), 64, flags[3], verbose=False))
    sick = data.XrayDataset(dataset.folder, [n for n in dataset.indices if dataset.abnormal[n]])
    results = evaluate.evaluate_checkpoints([teacher_file(tmp_path / "t.pt", ["COVID", "PNEUMONIA"])], sick, n_boot=50)
    table = evaluate.format_table(results)
    assert "nan" not in table and "normal/abnormal AUROC is n/a: all 24 test images are abnormal" in table
    assert [str(w.message) for w in recwarn] == []
