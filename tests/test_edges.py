"""The edges of --images, --seeds and checkpoints (round 4 of 'nothing silently wrong'): each bad input is one line
naming it and the right exit code, or the right result; results are whole files; a dying worker ends the run."""

import csv
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import train
from helpers import call, class_folders, entries, write_dicom, write_image, write_rows
from machinery import layouts, runs, runtime
from machinery.cache import StageCache
from machinery.runtime import save_checkpoint
from vit import VARIANTS, VisionTransformer, ViTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["COVID", "PNEUMONIA"]


def checkpoint(path, role="mlcak", res=32, seed=0, changed=None):
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig(img_size=64, num_local=2, **VARIANTS["vit_cpu"]))
    save_checkpoint(str(path), model, **dict(entries(role, res, LABELS, args=dict(seed=seed)), **(changed or {})))
    return str(path)


def one_line(err):
    return err.strip().count("\n") == 0 and "Traceback" not in err and "Warning" not in err


def scans(folder, n=3):
    for k in range(n):
        write_image(folder / f"{k}.png", k, k % 2)
    return str(folder)


def run(*argv, timeout=120, **kw):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, timeout=timeout, **kw)


def test_an_unnamed_csv_column_holding_labels_is_named_and_an_empty_one_is_fine(tmp_path):
    write_rows(tmp_path / "a.csv", ["path", "", "Effusion", "split"], [["x.png", 1, 0, "train"], ["y.png", 0, 1, "test"]])
    with pytest.raises(layouts.DataError, match=r"a.csv: column 2 has no name in the header but holds values \('1' on line 2\)"):
        layouts.read_csv(str(tmp_path / "a.csv"))
    write_rows(tmp_path / "b.csv", ["path", "Effusion", ""], [["x.png", 1, ""], ["y.png", 0, ""]])  # a trailing comma
    assert layouts.read_csv(str(tmp_path / "b.csv"))[0] == ["path", "Effusion", ""]


def test_two_students_of_one_role_and_resolution_are_told_apart_in_predictions(tmp_path, capsys):
    a, b = checkpoint(tmp_path / "a.pt", seed=0), checkpoint(tmp_path / "b.pt", seed=1)
    code, out, err = call(capsys, evaluate.cli, a, b, "--images", scans(tmp_path / "scans"), "--out-csv", str(tmp_path / "p.csv"))
    assert code == 0, err
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == [a] * 3 + [b] * 3 and {r["model"] for r in rows} == {"mlcak@32"}
    assert f"mlcak@32 ({a}): P(abnormal)" in out and f"mlcak@32 ({b}): P(abnormal)" in out


def test_maps_of_images_whose_names_collide_once_made_file_names_are_one_each(tmp_path, capsys):
    names = ["a,b.png", "a_b.png", "a b.png", "a+b.png"]
    for k, name in enumerate(names):
        write_image(tmp_path / "scans" / name, k, k % 2)
    code, out, err = call(capsys, evaluate.cli, checkpoint(tmp_path / "s.pt"), "--images", str(tmp_path / "scans"),
                         "--maps", str(tmp_path / "maps"))
    assert code == 0 and "wrote 4 figures" in out, err
    assert len([f for f in os.listdir(tmp_path / "maps") if f != "overview.png"]) == 4


def test_an_interrupted_run_keeps_the_earlier_predictions_whole_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    a, b = checkpoint(tmp_path / "a.pt", seed=0), checkpoint(tmp_path / "b.pt", seed=1)
    out_csv = tmp_path / "p.csv"
    assert call(capsys, evaluate.cli, b, "--images", scans(tmp_path / "scans"), "--out-csv", str(out_csv))[0] == 0
    before = out_csv.read_bytes()
    real, calls = evaluate.predict, []

    def interrupted_on_the_second_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "predict", interrupted_on_the_second_model)
    code, out, err = call(capsys, evaluate.cli, a, b, "--images", str(tmp_path / "scans"), "--out-csv", str(out_csv))
    assert code == 130 and out_csv.read_bytes() == before and os.listdir(tmp_path).count("p.csv") == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_two_runs_writing_one_csv_at_once_leave_one_whole_file(tmp_path, capsys, monkeypatch):
    a, b = checkpoint(tmp_path / "a.pt", seed=0), checkpoint(tmp_path / "b.pt", seed=1)
    one, two, out_csv = scans(tmp_path / "one", n=150), scans(tmp_path / "two", n=40), str(tmp_path / "p.csv")
    assert call(capsys, evaluate.cli, a, b, "--images", one, "--out-csv", str(tmp_path / "alone.csv"))[0] == 0
    real, calls = evaluate.predict, []

    def another_run_meanwhile(*args, **kwargs):  # while this run predicts its second model, another one writes out_csv
        calls.append(1)
        if len(calls) == 2:
            assert evaluate.cli([b, "--images", two, "--out-csv", out_csv]) == 0
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "predict", another_run_meanwhile)
    assert call(capsys, evaluate.cli, a, b, "--images", one, "--out-csv", out_csv)[0] == 0
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "alone.csv").read_bytes()  # whole: no mix, no NUL bytes


def test_a_file_name_that_is_not_utf8_is_read_predicted_and_trained_on(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1, as old zips extract it
    write_image(tmp_path / "scans" / name, 1, True)
    result = run("evaluate.py", checkpoint(tmp_path / "s.pt"), "--images", str(tmp_path / "scans"), "--out-csv",
                 str(tmp_path / "p.csv"), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"caf\xe9.png  abnormal" in result.stdout and b"caf\xe9.png" in (tmp_path / "p.csv").read_bytes()
    root = class_folders(tmp_path / "cls", per_class=6)
    write_image(tmp_path / "cls" / "train" / "COVID" / name, 7, True)
    result = run("train.py", "--data", root, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
                 "--img-size", "64", "--res", "32", "--epochs", "1", "--batch-size", "4", "--bootstrap", "0", timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def test_broken_and_looping_links_among_images_are_skipped_by_name(tmp_path, capsys):
    folder = scans(tmp_path / "scans")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "scans" / "gone.png")
    os.symlink(tmp_path / "scans" / "loop.png", tmp_path / "scans" / "loop.png")
    code, out, err = call(capsys, evaluate.cli, checkpoint(tmp_path / "s.pt"), "--images", folder)
    assert code == 0, err
    for link in ("gone.png", "loop.png"):
        assert f"skipped: {tmp_path / 'scans' / link}: a link that leads to no file (broken, or a loop)" in out


def test_a_csv_that_cannot_be_written_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    os.makedirs(tmp_path / "store")
    student, folder = checkpoint(tmp_path / "store" / "s.pt"), scans(tmp_path / "scans")
    os.makedirs(tmp_path / "p.csv")
    code, out, err = call(capsys, evaluate.cli, student, "--images", folder, "--out-csv", str(tmp_path / "p.csv"))
    assert code == 2 and one_line(err) and f"--out-csv {tmp_path / 'p.csv'}: cannot write there (it is a folder)" in err
    # a shared model store that is read-only (root writes anywhere, so the folder's answer is played here)
    monkeypatch.setattr(evaluate, "writable", lambda f: "OSError: Read-only file system" if f.endswith("store") else None)
    code, out, err = call(capsys, evaluate.cli, student, "--images", folder)
    assert code == 2 and one_line(err) and f"predictions.csv beside {student}: cannot write there (OSError: Read-only" in err
    assert "--out-csv" in err and out == ""


@pytest.mark.parametrize("changed, message", [
    (dict(args=[1, 2]), "its entry 'args' is list [1, 2], expected the training flags as a dict"),
    (dict(label_names={"COVID": 0, "PNEUMONIA": 1}), "its entry 'label_names' is dict"),
    (dict(res="32"), "its entry 'res' is str '32', expected an integer resolution"),
    (dict(role=None), "its entry 'role' is NoneType"),
])
def test_a_checkpoint_with_an_entry_of_the_wrong_type_is_named_everywhere_it_is_read(tmp_path, capsys, changed, message):
    bad = checkpoint(tmp_path / "bad.pt", role="teacher", res=64, changed=changed)
    code, out, err = call(capsys, evaluate.cli, bad)
    assert code == 1 and one_line(err) and f"{bad}: {message}" in err
    code, out, err = call(capsys, evaluate.cli, bad, "--images", scans(tmp_path / "scans"))
    assert code == 1 and one_line(err) and f"{bad}: {message}" in err
    root = class_folders(tmp_path / "cls", per_class=4)
    code, out, err = call(capsys, train.cli, "--data", root, "--cache-dir", str(tmp_path / "cache"), "--out",
                         str(tmp_path / "runs"), "--img-size", "64", "--res", "32", "--epochs", "1", "--teacher", bad)
    assert code == 1 and one_line(err) and f"{bad}: {message}" in err


def test_a_checkpoint_of_a_newer_vit_config_names_the_field(tmp_path, capsys):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=64, num_local=2, **VARIANTS["vit_cpu"]))
    path = tmp_path / "new.pt"
    torch.save(dict(entries("teacher", 64, LABELS), model=model.state_dict(),
                    vit_config=dict(vars(model.cfg), qk_norm=True)), path)
    code, out, err = call(capsys, evaluate.cli, str(path))
    assert code == 1 and one_line(err) and "its vit_config has a field 'qk_norm' this code does not know" in err


def test_memory_running_out_is_one_line_and_the_stage_cache_falls_back_to_computing_at_each_step(tmp_path, capsys, monkeypatch):
    def main(argv):
        torch.empty(1).new_empty(1)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 4194304000 bytes. Error code 12 (Cannot allocate memory)")

    code = runtime.run_cli(main, [], ())
    err = capsys.readouterr().err
    assert code == 1 and one_line(err) and "error: memory ran out" in err and "lower --batch-size" in err
    dataset = [(torch.rand(1, 64, 64), torch.zeros(2), 0, n) for n in range(16)]
    real_cat = torch.cat

    def cat_out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 999 bytes")

    class Listed(torch.utils.data.Dataset):
        local, abnormal, indices = np.zeros((16, 2)), np.zeros(16), np.arange(16)

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return dataset[i]

    monkeypatch.setattr(torch, "cat", cat_out_of_memory)
    cache = StageCache(Listed(), [lambda hr: hr * 2], 4, 0, 0, runs.Ddp(torch.device("cpu")))
    monkeypatch.setattr(torch, "cat", real_cat)
    assert cache.tables == {} and "stage cache: memory ran out" in capsys.readouterr().out
    hr, labels, index = next(cache.batches(0))
    assert hr.shape == (4, 1, 64, 64) and torch.equal(cache.get(lambda x: x * 2, hr, index), hr * 2)


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("a file where the cache folder would be")
    code, out, err = call(capsys, evaluate.cli, checkpoint(tmp_path / "s.pt"), "--images", scans(tmp_path / "scans"),
                         "--cache-dir", str(tmp_path / "file" / "cache"))
    assert code == 1 and one_line(err) and "error: cache: cannot write in" in err and "--cache-dir" in err


def test_a_log_saved_by_a_spreadsheet_with_semicolons_is_kept_by_resume(tmp_path):
    (tmp_path / "log.csv").write_text("epoch;step;total\n1;10;0.5\n2;20;0.4\n")
    log = runs.EpochLog(str(tmp_path), after_epoch=1)
    assert [r["epoch"] for r in log.rows] == ["1"]
    log.add(epoch=2, step=20, total="0.41")
    with open(tmp_path / "log.csv", newline="") as f:
        assert [(r["epoch"], r["total"]) for r in csv.DictReader(f)] == [("1", "0.5"), ("2", "0.41")]


@pytest.mark.parametrize("flags, message", [
    (["--bootstrap", "-5"], "--bootstrap must be 0 or more"), (["--seed", "-1"], "--seed must be 0 or more"),
    (["--num-maps", "-2"], "--num-maps must be at least 1"), (["--threshold", "nan"], "--threshold must be a probability"),
    (["--threshold", "1.5"], "--threshold must be a probability in [0, 1], got 1.5"),
])
def test_evaluate_flags_out_of_range_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    code, out, err = call(capsys, evaluate.cli, checkpoint(tmp_path / "s.pt"), *flags)
    assert code == 2 and one_line(err) and message in err


def test_a_decoding_worker_that_dies_ends_the_run_naming_its_file(tmp_path):
    folder = scans(tmp_path / "scans", n=6)
    write_image(tmp_path / "scans" / "huge.png", 9, True)
    script = ("import os, signal, sys; sys.path.insert(0, '.'); import machinery.cache as c; real = c._decode_one\n"
              "def dying(job):\n    if job[1].endswith('huge.png'): os.kill(os.getpid(), signal.SIGKILL)\n    return real(job)\n"
              f"c._decode_one = dying; import evaluate; sys.exit(evaluate.cli({[checkpoint(tmp_path / 's.pt'), '--images', folder, '--cache-dir', str(tmp_path / 'c')]!r}))")
    result = run("-c", script, timeout=120)  # a multiprocessing.Pool waits here for ever
    err = result.stderr.decode()
    assert result.returncode == 1 and one_line(err), err
    assert "a worker process ended abruptly (killed by the system: out of memory?)" in err and "huge.png" in err


def test_a_dicom_media_export_without_extensions_is_read_by_content(tmp_path, capsys):
    series = tmp_path / "export" / "DICOM" / "PA000000" / "ST000000" / "SE000000"
    os.makedirs(series)
    ramp = np.tile(np.linspace(0, 4000, 32), (32, 1)).round()
    for k in range(3):
        write_dicom(series / f"IM00000{k}", ramp + 10 * k)
    write_dicom(tmp_path / "export" / "DICOMDIR", ramp)  # the index of the export, not an image
    (tmp_path / "export" / "README").write_text("not an image")
    code, out, err = call(capsys, evaluate.cli, checkpoint(tmp_path / "s.pt"), "--images", str(tmp_path / "export"))
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines() if "  abnormal " in line] == [str(series / f"IM00000{k}") for k in range(3)]
    assert "ignored 2 files that are not images" in out


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_pickle_that_would_run_code_is_named_whatever_its_protocol_and_no_library_warning_leaks(tmp_path, capsys, protocol):
    class Payload:
        def __reduce__(self):
            return os.system, ("echo this must never run",)

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f, protocol=protocol)
    code, out, err = call(capsys, evaluate.cli, str(tmp_path / "evil.pt"))
    assert code == 1 and one_line(err) and "this must never run" not in out
    assert f"{tmp_path / 'evil.pt'}: not a plain-tensor checkpoint: it holds a pickled posix.system, which was refused" in err


def test_new_images_are_decoded_with_a_progress_line(tmp_path, capsys):
    code, out, err = call(capsys, evaluate.cli, checkpoint(tmp_path / "s.pt"), "--images", scans(tmp_path / "scans", n=5))
    assert code == 0 and "cache predict: 5/5 (" in out, err
    code, out, err = call(capsys, evaluate.cli, checkpoint(tmp_path / "s.pt"), "--images", str(tmp_path / "scans"))
    assert code == 0 and "cache predict" not in out  # decoded already: nothing to wait for
