"""The models in use (predict.py, through `evaluate.py CKPT --images`): your own files, unlabelled, of any size."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

import data
import evaluate
from evaluate import predict
from helpers import entries, write_dicom, write_image, write_rows
from machinery import layouts
from machinery.attention_maps import file_name
from machinery.runtime import load_checkpoint, save_checkpoint
from vit import VARIANTS, VisionTransformer, ViTConfig

LABELS = ["COVID", "PNEUMONIA"]


def checkpoint(path, role, res, seed):
    """A model as train.py saves it (untrained: predictions are compared, not judged)."""
    import torch
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig(img_size=64, num_local=2, **VARIANTS["vit_cpu"]))
    save_checkpoint(str(path), model, **entries(role, res, LABELS, args=dict(seed=seed)))
    return str(path)


def read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cli(capsys, *argv):
    code = evaluate.cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predictions_of_files_equal_those_through_a_dataset_and_skip_a_corrupt_file(tmp_path, capsys):
    for k in range(5):
        write_image(tmp_path / "scans" / f"{k}.png", k, k % 2, size=48 + 40 * k)  # 48 to 208 px: reduced or enlarged
    (tmp_path / "scans" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    student = checkpoint(tmp_path / "best.pt", "mlcak", 32, seed=1)
    code, out, err = cli(capsys, student, "--images", str(tmp_path / "scans"), "--device", "cpu")
    assert code == 0, err
    assert f"skipped: {tmp_path / 'scans' / 'broken.jpg'}: not a readable image" in out  # listed, and the batch goes on
    assert "ignored 1 files that are not images (by their names, or by content" in out
    rows = read_predictions(tmp_path / "predictions.csv")  # beside the checkpoint
    assert [r["path"] for r in rows] == [str(tmp_path / "scans" / f"{k}.png") for k in range(5)]  # as given, sorted
    assert set(rows[0]) == {"path", "model", "checkpoint", "abnormal", *LABELS} and {r["model"] for r in rows} == {"mlcak@32"}
    # the same files as a labelled dataset (a CSV layout), decoded, cached and predicted as in evaluation
    write_rows(tmp_path / "set.csv", ["path", *LABELS, "split"], [[f"scans/{k}.png", 0, 1, "test"] for k in range(5)]
               + [["scans/0.png", 1, 0, "train"]])
    dataset = data.XrayDataset(data.build_cache(layouts.load_source(str(tmp_path / "set.csv"), "test"), 64,
                                                str(tmp_path / "cache"), verbose=False))
    model, ckpt = load_checkpoint(student)
    local, abnormal, _, _ = predict(model, dataset, ckpt["res"], ckpt["norm"], "cpu")
    np.testing.assert_allclose([float(r["abnormal"]) for r in rows], abnormal, atol=1e-6)
    np.testing.assert_allclose([[float(r[n]) for n in LABELS] for r in rows], local, atol=1e-6)
    def listed(k, labels):
        return f"{tmp_path / 'scans' / f'{k}.png'}  abnormal {abnormal[k]:.3f}  {labels}\n"
    for k in range(5):  # one line per image: P(abnormal) and the labels above the threshold, else the three highest
        top = [f"{LABELS[j]} {local[k, j]:.2f}" for j in np.argsort(-local[k], kind="stable")]
        above = [t for t, p in zip(top, sorted(local[k], reverse=True)) if p >= 0.5]
        assert listed(k, ", ".join(above) if above else "none; highest " + ", ".join(top[:3])) in out
    code, out, err = cli(capsys, student, "--images", str(tmp_path / "scans" / "0.png"), "--threshold", "0", "--device", "cpu")
    assert code == 0 and out.count(listed(0, "")[:-1]) == 1 and all(f"{n} " in out for n in LABELS)  # p >= 0: all labels


def test_a_dicom_and_a_png_of_the_same_pixels_give_the_same_prediction(tmp_path, capsys):
    pixels = np.tile(np.arange(256), (256, 1))  # 0 .. 255: the DICOM's own range is the PNG's 8 bits
    pixels[64:128, 64:128] = 255 - pixels[64:128, 64:128]
    write_dicom(tmp_path / "x.dcm", pixels)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "x.png")
    teacher, student = checkpoint(tmp_path / "t.pt", "teacher", 64, seed=2), checkpoint(tmp_path / "s.pt", "mlcak", 32, seed=3)
    code, out, err = cli(capsys, teacher, student, "--images", str(tmp_path / "x.dcm"), str(tmp_path / "x.png"),
                         "--out-csv", str(tmp_path / "out" / "p.csv"), "--maps", str(tmp_path / "maps"), "--threshold", "0")
    assert code == 0, err
    rows = read_predictions(tmp_path / "out" / "p.csv")
    assert [(r["path"], r["model"]) for r in rows] == [(str(tmp_path / f), m) for m in ("teacher@64", "mlcak@32")
                                                       for f in ("x.dcm", "x.png")]
    for a, b in (rows[:2], rows[2:]):
        assert [a[k] for k in ("abnormal", *LABELS)] == [b[k] for k in ("abnormal", *LABELS)]
    assert "COVID" in out.splitlines()[-4] and "PNEUMONIA" in out.splitlines()[-4]  # --threshold 0: every label listed
    figure = Image.open(tmp_path / "maps" / f"{file_name(str(tmp_path / 'x.png'))}.png")
    assert figure.size == (3 * 64, 64 + 14)  # the image, then the teacher's and the student's attention side by side
    assert os.path.isfile(tmp_path / "maps" / "overview.png")


def test_a_folder_without_one_readable_image_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.png").write_bytes(b"garbage")
    student = checkpoint(tmp_path / "best.pt", "mlcak", 32, seed=1)
    code, out, err = cli(capsys, student, "--images", str(tmp_path / "scans"))
    assert code == 1 and err.strip().count("\n") == 0
    assert f"--images {tmp_path / 'scans'}: none of the 1 files is a readable image (first: {tmp_path / 'scans' / 'a.png'}" in err
    assert not os.path.exists(tmp_path / "predictions.csv")


@pytest.mark.parametrize("flag", [["--seeds"], ["--map-ids", "x"], ["--data", "."]])
def test_images_with_a_test_set_flag_is_a_parser_error(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit:
        evaluate.main([str(tmp_path / "best.pt"), "--images", str(tmp_path), *flag])
    assert exit.value.code == 2 and f"{flag[0]} does not apply" in capsys.readouterr().err
