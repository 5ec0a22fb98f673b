"""Each dataset layout as people download it (layouts.py): read, then trained end to end for one short epoch
(train.cli); then the label cells and paths that every CSV-based layout checks."""

import os
import re

import numpy as np
import pytest

import data
import train
from helpers import chexpert_folder, class_folders, nih_folder, vindr_folder, write_dicom, write_image, write_rows
from machinery import layouts


def short_run(capsys, tmp_path, dataset, *extra):
    """train.py on a layout, in this process: teacher, mlcak student, test table. Returns its output."""
    code = train.cli(["--data", str(dataset), "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
                      "--img-size", "64", "--res", "32", "--epochs", "1", "--batch-size", "4", "--bootstrap", "0",
                      "--log-every", "1", *extra])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "teacher epoch 1/1" in out and re.search(r"mean local AUROC \(\d+/\d+ labels\)", out)
    return out


def test_vindr_readers_majority_and_any(tmp_path):
    root = str(vindr_folder(tmp_path))
    major = layouts.load_source(root, "train", readers="majority")
    anyone = layouts.load_source(root, "train", readers="any")
    col = {name: k for k, name in enumerate(layouts.LOCAL_LABELS)}
    assert major.image_ids == ["a", "b"]
    assert major.local[0, col["Cardiomegaly"]] == 1 and major.local[0, col["Nodule/Mass"]] == 0
    assert major.local[1].sum() == 0 and list(major.abnormal) == [1, 0]
    assert anyone.local[0, col["Nodule/Mass"]] == 1 and anyone.local[1, col["ILD"]] == 1
    assert list(anyone.abnormal) == [1, 1]
    # b: normal by its local labels, but only one of three readers said 'No finding': counted, not hidden
    assert any(note.startswith("train: 1 of 2 images") for note in major.notes)
    np.testing.assert_array_equal(major.boxes, [[0, col["Cardiomegaly"], 2, 1, 6, 4]])
    assert any("outside the label set not used: Cardiomegally" in note for note in major.notes)


@pytest.mark.parametrize("spelling", ["Other disease", "Other diseases"])
def test_vindr_test_split_accepts_both_spellings(tmp_path, spelling):
    test = layouts.load_source(str(vindr_folder(tmp_path, spelling)), "test")
    assert test.image_ids == ["t"] and test.local[0, layouts.LOCAL_LABELS.index("Pleural effusion")] == 1
    assert test.boxes.shape == (1, 6)


ORIGINAL = np.tile(np.linspace(0, 4000, 128), (96, 1)).round()  # a Kaggle DICOM of 96 rows and 128 columns


def kaggle_folder(root, n=40, resized=None, meta=True):
    """VinBigData: train.csv, a row per box per reader; train/<id>.dicom, or a resized copy (train/<id>.png at
    `resized` px, boxes still in the original 128 x 96 pixels, train_meta.csv giving that size)."""
    rows = []
    for k in range(n):
        image_id = f"img{k:03d}"
        sick = k % 2
        for rad in ("R8", "R9", "R10"):
            finding = sick and rad != "R10"
            rows.append([image_id, "Cardiomegaly" if finding else "No finding", 3 if finding else 14, rad,
                         *([32, 24, 64, 48] if finding else ["", "", "", ""])])
        if resized:
            write_image(os.path.join(root, "train", f"{image_id}.png"), k, sick, size=resized)
        else:
            os.makedirs(os.path.join(root, "train"), exist_ok=True)
            write_dicom(os.path.join(root, "train", f"{image_id}.dicom"), ORIGINAL)
    write_rows(os.path.join(root, "train.csv"), ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"], rows)
    if resized and meta:
        write_rows(os.path.join(root, "train_meta.csv"), ["image_id", "dim0", "dim1"], [[f"img{k:03d}", 96, 128] for k in range(n)])
    return str(root)


def test_kaggle_layout_its_split_and_its_validation(tmp_path):
    root = kaggle_folder(tmp_path)
    sources = layouts.load_sources(root)
    train_ids, test_ids = set(sources["train"].image_ids), set(sources["test"].image_ids)
    assert train_ids | test_ids == {f"img{k:03d}" for k in range(40)} and not train_ids & test_ids
    assert test_ids == {i for i in train_ids | test_ids if layouts.hash_fraction(i) < 0.2} and 2 <= len(test_ids) <= 16
    assert sources["train"].label_names == layouts.KAGGLE_LABELS and len(layouts.KAGGLE_LABELS) == 14
    card = layouts.KAGGLE_LABELS.index("Cardiomegaly")
    odd = np.array([int(i[3:]) % 2 for i in sources["train"].image_ids])
    np.testing.assert_array_equal(sources["train"].local[:, card], odd)  # two of three readers: positive by majority
    cache = data.XrayDataset(data.build_cache(sources["train"], 16, str(tmp_path / "cache"), workers=1, verbose=False))
    assert len(data.validation_rows(cache, 0.1)) > 0  # the bug: always empty, then an IndexError


def test_kaggle_resized_copy_finds_pngs_and_rescales_boxes_from_the_original_size(tmp_path):
    sources = layouts.load_sources(kaggle_folder(tmp_path / "png", resized=48))
    train = sources["train"]
    assert all(p.endswith(".png") for p in train.paths)
    ds = data.XrayDataset(data.build_cache(train, 64, str(tmp_path / "cache"), workers=1, verbose=False))
    n = next(n for n in ds.indices if len(ds.boxes(n)))
    # a box 32..64 x 24..48 in the original 128 x 96 pixels: 16..32 x 16..32 on the 64 px cache image
    np.testing.assert_allclose(ds.boxes(n)[0, 1:], [16, 16, 32, 32])
    without = layouts.load_sources(kaggle_folder(tmp_path / "nometa", resized=48, meta=False))["train"]
    assert len(without.boxes) == 0 and any("train_meta.csv is missing" in note for note in without.notes)


@pytest.mark.parametrize("resized", [None, 48])
def test_kaggle_layout_trains_end_to_end_from_dicoms_and_from_a_resized_copy(tmp_path, capsys, resized):
    out = short_run(capsys, tmp_path, kaggle_folder(tmp_path / "kaggle", resized=resized))
    assert "mlcak epoch 1/1" in out and "attention in box" in out  # boxes placed on the image: localization measured


def test_nih_layout_lists_boxes_and_label_spelling(tmp_path):
    root = nih_folder(tmp_path / "nih")
    sources = layouts.load_sources(root)
    train, test = sources["train"], sources["test"]
    assert train.label_names == layouts.NIH_LABELS and len(layouts.NIH_LABELS) == 14
    assert set(test.image_ids) == {line.strip() for line in open(os.path.join(root, "test_list.txt"))}
    assert set(train.groups).isdisjoint(test.groups)  # the official split is by patient
    n = train.image_ids.index("00000001_001.png")  # 'Infiltration|Effusion'
    assert train.local[n].tolist() == [int(k in ("Infiltration", "Effusion")) for k in layouts.NIH_LABELS] and train.abnormal[n] == 1
    normal = train.image_ids.index("00000003_001.png")  # 'No Finding'
    assert train.local[normal].sum() == 0 and train.abnormal[normal] == 0
    assert "images_002" in train.paths[train.image_ids.index("00000001_000.png")]  # spread over images_00N/images/
    np.testing.assert_allclose(train.boxes, [[n, layouts.NIH_LABELS.index("Effusion"), 4.5, 6, 14.5, 18]])  # x, y, w, h
    assert test.boxes[0, 1] == layouts.NIH_LABELS.index("Infiltration")  # 'Infiltrate' in BBox_List_2017.csv
    hashed = layouts.load_sources(nih_folder(tmp_path / "nolists", lists=False))
    assert set(hashed["train"].groups).isdisjoint(hashed["test"].groups)  # no lists: a hash split by patient
    assert any("held out by a hash" in note for note in hashed["train"].notes)


def test_nih_layout_trains_end_to_end(tmp_path, capsys):
    out = short_run(capsys, tmp_path, nih_folder(tmp_path / "nih"))
    assert "14 local labels" in out and "mlcak epoch 1/1" in out


@pytest.mark.parametrize("policy", ["zeros", "ones"])
def test_chexpert_frontal_views_uncertain_policy_and_blank_labels(tmp_path, policy):
    root = chexpert_folder(str(tmp_path))
    sources = layouts.load_sources(root, uncertain=policy)
    train, test = sources["train"], sources["test"]
    assert train.label_names == layouts.CHEXPERT_LABELS and len(train.image_ids) == 16 and len(test.image_ids) == 16
    assert all("frontal" in p for p in train.paths) and any("32 lateral views not used" in n for n in train.notes)
    edema = layouts.CHEXPERT_LABELS.index("Edema")
    patient = {g: n for n, g in enumerate(train.groups)}
    assert train.local[patient["patient00001"], edema] == 1  # 1.0
    assert train.local[patient["patient00003"], edema] == 0  # 0.0
    assert train.local[patient["patient00002"], edema] == (policy == "ones")  # -1.0: uncertain
    assert train.abnormal[patient["patient00003"]] == 0 and train.abnormal[patient["patient00001"]] == 1  # No Finding
    assert any(f"uncertain (-1) read as {int(policy == 'ones')} (--uncertain {policy})" in n for n in train.notes)
    assert all(os.path.isfile(p) for p in test.paths) and test.groups[0] == "patient64541"  # valid.csv is the test split


def test_chexpert_trains_end_to_end_with_the_uncertain_flag(tmp_path, capsys):
    out = short_run(capsys, tmp_path, chexpert_folder(str(tmp_path)), "--uncertain", "ones", "--views", "all")
    assert "(--uncertain ones)" in out and "lateral" not in out and "13 local labels" in out


def test_class_folders_with_split_folders_and_a_val_folder(tmp_path):
    root = class_folders(tmp_path / "cls", splits=("train", "val", "test"), normal="normal")
    sources = layouts.load_sources(root)
    train, test = sources["train"], sources["test"]
    assert train.label_names == ["COVID", "PNEUMONIA"] and len(test.image_ids) == 36
    assert train.val.sum() == 36 and all(i.startswith("val/") for i, v in zip(train.image_ids, train.val) if v)
    n = train.image_ids.index("train/PNEUMONIA/pneumonia-train-0.png")
    assert train.local[n].tolist() == [0, 1] and train.abnormal[n] == 1
    assert train.abnormal[train.image_ids.index("train/normal/normal-train-0.png")] == 0
    assert any("3 hidden files and folders ignored" in note for note in train.notes)  # the .DS_Store files
    ds = data.XrayDataset(data.build_cache(train, 16, str(tmp_path / "cache"), workers=1, verbose=False))
    val = data.validation_rows(ds, 0.1)
    assert {ds.image_ids[n].split("/")[0] for n in val} == {"val"} and len(val) == 36  # the val/ folder, not a hash


@pytest.mark.parametrize("normal", ["NORMAL", "No Finding", "negative"])
def test_class_folders_without_split_folders_use_a_hash_split(tmp_path, normal):
    sources = layouts.load_sources(class_folders(tmp_path / "flat", splits=(), per_class=20, normal=normal, junk=False))
    assert sources["train"].label_names == ["COVID", "PNEUMONIA"]
    assert len(sources["test"].image_ids) > 0 and not set(sources["train"].image_ids) & set(sources["test"].image_ids)
    assert sources["train"].abnormal.sum() < len(sources["train"].image_ids)  # the normal class is normal


def test_class_folders_train_end_to_end_and_draw_maps_of_ids_with_folders(tmp_path, capsys):
    root = class_folders(tmp_path / "cls")
    out = short_run(capsys, tmp_path, root, "--compare")
    assert "baseline epoch 1/1" in out and "attention in box" not in out  # no boxes: no localization rows
    table = next(f for f in os.listdir(tmp_path / "runs") if f.endswith(".md"))
    assert "attention in box" not in open(tmp_path / "runs" / table).read()
    maps = os.listdir(tmp_path / "runs" / table.replace(".md", "-maps"))
    assert "overview.png" in maps and any(m.startswith("test_COVID_") for m in maps)  # ids with folders as file names


def test_csv_with_boxes_patients_and_no_split_trains_and_measures_localization(tmp_path, capsys):
    rows, boxes = [], []
    for k in range(48):
        sick = k % 2
        write_image(tmp_path / "img" / f"{k // 10}" / f"{k}.png", k, sick)  # paths with folders
        rows.append([f"img/{k // 10}/{k}.png", sick, f"p{k // 2}"])
        if sick:
            boxes.append([f"img/{k // 10}/{k}.png", "Nodule", 12, 12, 24, 24])
    boxes.append(["img/0/1.png", "Mass", 1, 1, 5, 5])  # a label outside the set: counted and named
    boxes += [[f"img/{k // 10}/{k}.png", "Nodule", 30, 30, 90, 90] for k in (1, 3)]  # beyond the 48-pixel images
    write_rows(tmp_path / "labels.csv", ["path", "Nodule", "patient_id"], rows)
    write_rows(tmp_path / "boxes.csv", ["path", "label", "x_min", "y_min", "x_max", "y_max"], boxes)
    sources = layouts.load_sources(str(tmp_path / "labels.csv"))
    assert len(sources["train"].boxes) + len(sources["test"].boxes) == 26
    assert any("outside the label set not used: Mass" in n for s in sources.values() for n in s.notes)
    out = short_run(capsys, tmp_path, tmp_path / "labels.csv")
    assert "attention in box" in out and "pointing game" in out
    assert re.search(r"data: (train|test): \d boxes are empty or leave their image and are not used .*boxes.csv, line \d+: "
                     r"x 30..90, y 30..90 leaves the image of 48 x 48 pixels", out)


# ---- label cells and paths, the same in every layout that reads a CSV

def test_a_csv_with_a_header_and_no_rows_says_the_split_is_empty(tmp_path):
    write_rows(tmp_path / "empty.csv", ["path", "Pneumonia"], [], bom=True)
    with pytest.raises(layouts.DataError, match="the train split is empty"):
        layouts.load_source(str(tmp_path / "empty.csv"), "train")


@pytest.mark.parametrize("value", ["2", "0.5", "yes"])
def test_a_label_that_is_not_1_0_or_minus_1_is_named_with_its_line(tmp_path, value):
    write_image(tmp_path / "a.png", 0, True)
    write_rows(tmp_path / "bad.csv", ["path", "Pneumonia", "Effusion"], [["a.png", 1, 0], ["a.png", 0, value]])
    with pytest.raises(layouts.DataError, match=rf"bad.csv, line 3, column 'Effusion': holds '{value}'"):
        layouts.load_sources(str(tmp_path / "bad.csv"))


@pytest.mark.parametrize("policy, expected", [("zeros", 0), ("ones", 1)])
def test_uncertain_and_blank_labels_are_read_by_policy_and_counted(tmp_path, policy, expected):
    for n in range(10):
        write_image(tmp_path / f"{n}.png", n, n % 2)
    write_rows(tmp_path / "u.csv", ["path", "split", "Edema", "Effusion"],
               [[f"{n}.png", "train" if n < 8 else "test", -1 if n == 0 else n % 2, "" if n == 1 else 0] for n in range(10)])
    train = layouts.load_sources(str(tmp_path / "u.csv"), uncertain=policy)["train"]
    assert train.local[0, 0] == expected and train.local[1, 1] == 0
    assert any(f"1 blank label cells read as 0, 1 uncertain (-1) read as {expected} (--uncertain {policy})" in n for n in train.notes)


def test_missing_column_file_and_folder_are_named(tmp_path):
    write_image(tmp_path / "a.png", 0, True)
    with pytest.raises(layouts.DataError, match="no such file or folder"):
        layouts.load_source(str(tmp_path / "nowhere"), "train")
    write_rows(tmp_path / "x.csv", ["path", "split"], [["a.png", "train"]])
    with pytest.raises(layouts.DataError, match="no label columns"):
        layouts.load_source(str(tmp_path / "x.csv"), "train")
    write_rows(tmp_path / "y.csv", ["file", "Cardiomegaly"], [["a.png", 1]])
    with pytest.raises(layouts.DataError, match="missing column 'path'"):
        layouts.load_source(str(tmp_path / "y.csv"), "train")
    write_rows(tmp_path / "z.csv", ["path", "Cardiomegaly", "split"], [["a.png", 1, "train"], ["b.png", 0, "test"]])
    with pytest.raises(layouts.DataError, match=r"b\.png: listed in .*z.csv but no such file \(1 missing in all\)"):
        layouts.load_source(str(tmp_path / "z.csv"), "train")
    with open(tmp_path / "short.csv", "w") as f:  # a row cut short: its path and split cells are missing
        f.write("Cardiomegaly,path,split\n1,a.png,train\n0\n")
    with pytest.raises(layouts.DataError, match=r"short.csv, line 3: column 'path' is empty"):
        layouts.load_source(str(tmp_path / "short.csv"), "train")


def test_a_box_corner_that_is_not_a_number_is_named_with_its_file_line_and_column(tmp_path):
    write_image(tmp_path / "a.png", 0, True)
    write_rows(tmp_path / "labels.csv", ["path", "Nodule"], [["a.png", 1]])
    write_rows(tmp_path / "boxes.csv", ["path", "label", "x_min", "y_min", "x_max", "y_max"],
               [["a.png", "Nodule", 1, 2, 3, 4], ["a.png", "Nodule", 1, "", 3, 4]])
    with pytest.raises(layouts.DataError, match=r"boxes.csv, line 3, column 'y_min': holds '', expected a number"):
        layouts.load_sources(str(tmp_path / "labels.csv"))
    write_rows(tmp_path / "boxes.csv", ["path", "label", "x_min", "y_min", "x_max", "y_max"],
               [["a.png", "Nodule", 1, 2, "nan", 4]])  # a NaN corner would make a box that covers nothing
    with pytest.raises(layouts.DataError, match=r"boxes.csv, line 2, column 'x_max': holds 'nan', expected a number"):
        layouts.load_sources(str(tmp_path / "labels.csv"))
    root = nih_folder(tmp_path / "nih")
    with open(os.path.join(root, "BBox_List_2017.csv"), "a") as f:
        f.write("00000002_000.png,Mass,10,10,wide,5,,,\n")
    with pytest.raises(layouts.DataError, match=r"BBox_List_2017.csv, line 4, column 'w': holds 'wide'"):
        layouts.load_sources(root)



def test_a_header_that_names_a_column_twice_is_one_line(tmp_path):
    write_image(tmp_path / "a.png", 0, True)
    write_rows(tmp_path / "dup.csv", ["path", "Nodule", "Nodule", "split"], [["a.png", 1, 0, "train"]])
    with pytest.raises(layouts.DataError, match="dup.csv: the header names column 'Nodule' 2 times"):
        layouts.load_sources(str(tmp_path / "dup.csv"))


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_separated_by_semicolons_or_tabs_is_read_as_one_separated_by_commas(tmp_path, delimiter):
    for n in range(6):
        write_image(tmp_path / f"{n}.png", n, n % 2)
    rows = [["path", "Nodule", "split"]] + [[f"{n}.png", n % 2, "test" if n > 3 else "train"] for n in range(6)]
    (tmp_path / "set.csv").write_text("\n".join(delimiter.join(map(str, r)) for r in rows) + "\n")
    sources = layouts.load_sources(str(tmp_path / "set.csv"))
    assert sources["train"].label_names == ["Nodule"] and sources["train"].local[:, 0].tolist() == [0, 1, 0, 1]


def test_a_utf16_csv_is_read_and_a_cp1252_one_is_named_with_its_encoding(tmp_path):
    write_image(tmp_path / "réseau.png", 0, True)
    write_image(tmp_path / "b.png", 1, False)
    text = "path,Nodule,split\nréseau.png,1,train\nb.png,0,test\n"
    (tmp_path / "utf16.csv").write_text(text, encoding="utf-16")  # with its byte-order mark, as Excel's 'Unicode text'
    assert layouts.load_source(str(tmp_path / "utf16.csv"), "train").paths[0].endswith("réseau.png")
    (tmp_path / "cp1252.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(layouts.DataError, match=r"cp1252.csv, line 2: not UTF-8 \(byte 0xe9; Windows-1252 or Latin-1"):
        layouts.load_sources(str(tmp_path / "cp1252.csv"))


def test_hidden_folders_are_not_labels_and_bmp_and_tiff_are_images_in_class_folders(tmp_path):
    root = class_folders(tmp_path / "cls", splits=(), per_class=6, junk=False)
    write_image(tmp_path / "cls" / ".ipynb_checkpoints" / "x-checkpoint.png", 1, True)  # a notebook's copy
    write_image(tmp_path / "cls" / "COVID" / ".hidden.png", 2, True)
    for ext in ("bmp", "tif"):
        write_image(tmp_path / "cls" / "COVID" / f"scan.{ext}", 3, True)
    table = layouts.read_class_folders(root)
    assert table.label_names == ["COVID", "PNEUMONIA"]  # not '.ipynb_checkpoints'
    assert {r.image_id for r in table.rows} >= {"COVID/scan.bmp", "COVID/scan.tif"} and len(table.rows) == 20
    assert any("2 hidden files and folders ignored" in n for n in table.notes)
    assert not any("not images" in n for n in table.notes)


def test_csv_paths_that_leave_the_dataset_are_said(tmp_path):
    write_image(tmp_path / "set" / "a.png", 0, True)
    write_image(tmp_path / "elsewhere" / "b.png", 1, False)
    write_rows(tmp_path / "set" / "labels.csv", ["path", "Nodule", "split"],
               [["a.png", 1, "train"], ["../elsewhere/b.png", 0, "train"], [str(tmp_path / "elsewhere" / "b.png"), 0, "test"],
                ["/etc/passwd", 0, "train"], ["/proc/self/environ", 1, "train"]])
    train = layouts.load_sources(str(tmp_path / "set" / "labels.csv"))["train"]
    assert any(n.startswith("4 paths in ") and "lie outside its folder" in n and "e.g. ../elsewhere/b.png" in n
               for n in train.notes)
    folder = data.build_cache(train, 16, str(tmp_path / "cache"), workers=1, verbose=False)
    skipped = open(os.path.join(folder, "skipped.txt")).read().splitlines()  # system files: never trained on
    assert skipped == ["/etc/passwd: not a readable image (UnidentifiedImageError: cannot identify image file '/etc/passwd')",
                       "/proc/self/environ: an empty file"]
    assert len(data.XrayDataset(folder)) == 2


def test_boxes_that_leave_their_image_or_are_empty_are_named_and_never_scored(tmp_path):
    write_image(tmp_path / "a.png", 0, True)  # 48 x 48
    write_image(tmp_path / "b.png", 1, False)
    write_rows(tmp_path / "labels.csv", ["path", "Nodule", "split"], [["a.png", 1, "test"], ["b.png", 0, "train"]])
    write_rows(tmp_path / "boxes.csv", ["path", "label", "x_min", "y_min", "x_max", "y_max"], [
        ["a.png", "Nodule", 12, 12, 24, 24],    # good
        ["a.png", "Nodule", 60, 60, 80, 80],    # outside the image
        ["a.png", "Nodule", -30, 5, 10, 20],    # negative
        ["a.png", "Nodule", 30, 5, 10, 20],     # x_max < x_min
        ["a.png", "Nodule", 0, 0, 100, 100],    # larger than the image
        ["a.png", "Nodule", 0, 0, 48.5, 48]])   # half a pixel over an edge: rounding, kept and clipped
    test = data.XrayDataset(data.build_cache(layouts.load_source(str(tmp_path / "labels.csv"), "test"), 48,
                                             str(tmp_path / "cache"), workers=1, verbose=False))
    assert len(test.boxes(0)) == 2 and len(test.bad_boxes) == 4
    assert test.bad_boxes[0] == f"{tmp_path / 'boxes.csv'}, line 3: x 60..80, y 60..80 leaves the image of 48 x 48 pixels"
    assert "line 5: x 30..10, y 5..20 is empty or inverted" in test.bad_boxes[2]
