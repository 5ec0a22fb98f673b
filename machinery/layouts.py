"""
The chest X-ray datasets as people download them, read into labelled images: for each, its file, its local (MLCT)
and global (MCCT) targets, its patient and split, and the finding boxes. cache.py decodes and caches the pixels.

    load_sources(path) -> {'train': Source, 'test': Source}    any layout below, files checked, boxes matched

Layouts, told apart by what --data holds (README, "Data"):
    VinDr-CXR (PhysioNet)  annotations/image_labels_{train,test}.csv, annotations_{train,test}.csv, {train,test}/*.dicom
    VinBigData (Kaggle)    train.csv (a row per box per reader), train/<image_id>.{dicom,png,jpg}, train_meta.csv
    NIH ChestX-ray14       Data_Entry_2017*.csv, images*/, train_val_list.txt, test_list.txt, BBox_List_2017.csv
    CheXpert               train.csv and valid.csv (the test split) with Path, Frontal/Lateral and 14 observations
    class folders          ROOT/{train,val,test}/<CLASS>/*, or ROOT/<CLASS>/*; a class named normal is the normal class
    CSV                    a .csv: path, a column per label; optional No finding, split, image_id, patient_id; boxes.csv

Where a layout has no test split, it is drawn by a hash of the patient (or image) id, the same on every machine.
"""

import csv
import glob
import hashlib
import io
import math
import os
import re
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np

LOCAL_LABELS = [  # VinDr-CXR's 22 local labels, in VinDr's order (the MLCT targets)
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion"]
GLOBAL_LABELS = ["COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]
KAGGLE_LABELS = [name for name in LOCAL_LABELS if name in {  # VinBigData's 14 classes (class_id 14 = No finding)
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis"}]
NIH_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
CHEXPERT_LABELS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]  # with 'No Finding', CheXpert's 14 observations
NORMAL_NAMES = {"normal", "no finding", "no_finding", "nofinding", "negative"}  # class folders of the normal class
# what every layout reads as an image (decode.read_image); a layout that finds files by name takes these
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".dicom")


def is_image_file(path):
    """An image by its name (IMAGE_EXTENSIONS), or, where the name has no extension (DICOM media, as
    DICOM/PA000000/ST000000/SE000000/IM000000), by its content: the DICM preamble. DICOMDIR is an index, not an image."""
    name = os.path.basename(path)
    if name.lower().endswith(IMAGE_EXTENSIONS):
        return True
    if "." in name or name.upper() == "DICOMDIR":
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


class DataError(Exception):
    """Bad input: the message is one line that names the path, column or label at fault."""


def hash_fraction(key):
    """A number in [0, 1) fixed by the string alone (the same on every machine), for deterministic splits."""
    return int(hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16) / 2 ** 32


# ---------------------------------------------------------------------------------------------- what a reader returns

@dataclass
class Source:
    name: str             # the layout: vindr, kaggle, nih, chexpert, folders or csv
    split: str            # 'train' (its validation images included, see val) or 'test'
    image_ids: list
    paths: list
    label_names: list
    local: np.ndarray     # (N, L) uint8, the local (MLCT) targets
    abnormal: np.ndarray  # (N,) uint8, the global (MCCT) target: 0 normal, 1 abnormal
    boxes: np.ndarray     # (M, 6) float32: image index, label index, x_min, y_min, x_max, y_max, in frame pixels
    box_origins: list     # (M,) where each box was read: 'file, line N'
    frames: np.ndarray    # (N, 2) rows and columns of the pixels the boxes are given in; 0 = the image's own size
    groups: list          # patient ids where known, else image ids: what a split never cuts through
    val: np.ndarray       # (N,) bool: the layout's own validation images (a val/ folder, split=val)
    notes: list = field(default_factory=list)  # what the reader should be told (counts of choices made)


# one image as a layout reader finds it: abnormal None = derived from the local labels; split None = not given
Row = namedtuple("Row", "image_id path local abnormal split group")


@dataclass
class Table:
    """What every layout reader returns: the Rows of all splits, and boxes (image_id, label name, x_min, y_min,
    x_max, y_max, 'file, line N') in the pixels of the original image (or of its frame, see frames)."""
    name: str
    label_names: list
    rows: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    frames: dict = field(default_factory=dict)  # image_id -> (rows, columns) of the box coordinates
    notes: list = field(default_factory=list)
    blank: int = 0      # label cells left blank, read as 0
    uncertain: int = 0  # label cells holding -1, read by the --uncertain policy


def read_csv(path, required=()):
    """
    (header, rows as dicts), read as spreadsheets save CSV files: UTF-8 (a byte-order mark is fine) or UTF-16 (it
    has one), separated by commas, or by semicolons or tabs where the header holds those and no comma. A header
    that names a column twice, or a file in another encoding, is a DataError naming it.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[err.start]:02x}; Windows-1252 or Latin-1, as older "
                        "spreadsheets save?); save it as CSV UTF-8") from None
    first = text.split("\n", 1)[0]
    delimiter = next((d for d in (";", "\t") if d in first and "," not in first), ",")
    reader = csv.DictReader(io.StringIO(text, newline=""), restval="", delimiter=delimiter)  # a short row's missing cells: blank
    header = [c.strip() for c in reader.fieldnames or []]
    for k in (k for k, c in enumerate(header) if not c):  # an unnamed column is fine while it is empty, never dropped full
        cells = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        held = next(((line, row[k]) for line, row in enumerate(cells, 1) if line > 1 and len(row) > k and row[k].strip()), None)
        if held:
            raise DataError(f"{path}: column {k + 1} has no name in the header but holds values ('{held[1]}' on line "
                            f"{held[0]}); name it (a label?) or delete it")
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: the header names column '{repeated[0]}' {header.count(repeated[0])} times; each column "
                        "once (a repeated label would keep only its last column)")
    reader.fieldnames = header
    rows = list(reader)
    for column in required:
        if column not in header:
            raise DataError(f"{path}: missing column '{column}'")
    return header, rows


def label_value(table, value, path, line, column, uncertain="zeros"):
    """A label cell: 1 or 0; blank is 0; -1 (uncertain, as in CheXpert) by --uncertain; anything else an error."""
    v = (value or "").strip()
    if v in ("1", "1.0"):
        return 1
    if v in ("0", "0.0", ""):
        if v == "":
            table.blank += 1
        return 0
    if v in ("-1", "-1.0"):
        table.uncertain += 1
        return int(uncertain == "ones")
    raise DataError(f"{path}, line {line}, column '{column}': holds '{value}', expected 1, 0, -1 (uncertain) or blank")


def aggregate_readers(votes, n_readers, readers):
    """votes (N, L) positive-reader counts -> (N, L) uint8: 'majority' is more than half the readers, 'any' one."""
    if readers == "majority":
        return (2 * votes > n_readers[:, None]).astype(np.uint8)
    return (votes > 0).astype(np.uint8)


def number(value, path, line, column):
    """A coordinate or size cell as a float; anything else (blank, text, nan) is an error that names the cell."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = math.nan
    if not math.isfinite(result):
        raise DataError(f"{path}, line {line}, column '{column}': holds '{value}', expected a number")
    return result


def box_rows(path, rows, id_column="image_id", label_column="class_name"):
    """(image_id, label, x_min, y_min, x_max, y_max, origin) of the rows that have a box (a 'No finding' row has
    none); origin is 'file, line N', so that a box that leaves its image can be named."""
    corners = ("x_min", "y_min", "x_max", "y_max")
    return [(r[id_column], r[label_column], *(number(r[c], path, line, c) for c in corners), f"{path}, line {line}")
            for line, r in enumerate(rows, 2) if r[corners[0]].strip()]


# ---------------------------------------------------------------------------------------------- the layouts

def read_vindr(root, readers="majority", **_):
    table = Table("vindr", list(LOCAL_LABELS))
    for split in ("train", "test"):
        path = os.path.join(root, "annotations", f"image_labels_{split}.csv")
        _, rows = read_csv(path, ["image_id"] + LOCAL_LABELS + ["No finding"])
        ids = sorted({r["image_id"] for r in rows})
        index = {i: n for n, i in enumerate(ids)}
        votes, no_finding, n_readers = np.zeros((len(ids), len(LOCAL_LABELS))), np.zeros(len(ids)), np.zeros(len(ids))
        for line, r in enumerate(rows, 2):  # the train file has one row per reader, the test file one consensus row
            n = index[r["image_id"]]
            votes[n] += [label_value(table, r[c], path, line, c) for c in LOCAL_LABELS]
            no_finding[n] += label_value(table, r["No finding"], path, line, "No finding")
            n_readers[n] += 1
        local = aggregate_readers(votes, n_readers, readers)
        said_normal = aggregate_readers(no_finding[:, None], n_readers, readers)[:, 0]
        disagree = int((local.any(1) == (said_normal == 1)).sum())
        table.notes.append(f"{split}: {disagree} of {len(ids)} images have a 'No finding' vote that disagrees with "
                           "their local labels; the local labels decide (normal = no local label positive)")
        table.rows += [Row(i, os.path.join(root, split, f"{i}.dicom"), list(local[n]), None, split, i) for n, i in enumerate(ids)]
        folder = os.path.join(root, split)
        unlabelled = sorted({os.path.splitext(f)[0] for f in os.listdir(folder)} - set(ids)) if os.path.isdir(folder) else []
        if unlabelled:
            table.notes.append(f"{len(unlabelled)} files in {folder} have no labels and are not used, e.g. {unlabelled[0]}")
        boxes = os.path.join(root, "annotations", f"annotations_{split}.csv")
        table.boxes += box_rows(boxes, read_csv(boxes, ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"])[1])
    return table


def read_kaggle(root, readers="majority", **_):
    """VinBigData: the original DICOMs or a resized PNG/JPEG copy; boxes are in the original pixels."""
    table = Table("kaggle", list(KAGGLE_LABELS))
    path = os.path.join(root, "train.csv")
    _, rows = read_csv(path, ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"])
    folder = os.path.join(root, "train")
    files = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and stem not in files:
            files[stem] = os.path.join(folder, name)
    ids = sorted({r["image_id"] for r in rows})
    index, label_index = {i: n for n, i in enumerate(ids)}, {c: k for k, c in enumerate(KAGGLE_LABELS)}
    reader_sets, positive = [set() for _ in ids], {}
    for r in rows:
        n = index[r["image_id"]]
        reader_sets[n].add(r["rad_id"])
        if r["class_name"] in label_index:  # a reader with several boxes of one class votes once
            positive.setdefault((n, label_index[r["class_name"]]), set()).add(r["rad_id"])
    votes = np.zeros((len(ids), len(KAGGLE_LABELS)))
    for (n, k), who in positive.items():
        votes[n, k] = len(who)
    local = aggregate_readers(votes, np.array([len(s) for s in reader_sets], float), readers)
    table.rows = [Row(i, files.get(i, os.path.join(folder, f"{i}.dicom")), list(local[n]), None, None, i) for n, i in enumerate(ids)]
    table.boxes = box_rows(path, rows)
    meta = os.path.join(root, "train_meta.csv")
    if os.path.isfile(meta):  # a resized copy: the original sizes place the boxes on the smaller image
        _, sizes = read_csv(meta, ["image_id", "dim0", "dim1"])
        table.frames = {r["image_id"]: (number(r["dim0"], meta, line, "dim0"), number(r["dim1"], meta, line, "dim1"))
                        for line, r in enumerate(sizes, 2)}
    elif any(not p.lower().endswith((".dicom", ".dcm")) for p in files.values()):
        table.notes.append(f"{folder} holds resized PNG/JPEG files but {meta} is missing: the boxes (in original "
                           "DICOM pixels) cannot be placed on them and are not used; localization is not measured")
        table.boxes = []
    return table


def read_nih(root, **_):
    """NIH ChestX-ray14 as downloaded: the official patient-wise split where its lists are there."""
    table = Table("nih", list(NIH_LABELS))
    entry = next(p for p in (os.path.join(root, f) for f in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")) if os.path.isfile(p))
    _, rows = read_csv(entry, ["Image Index", "Finding Labels", "Patient ID"])
    files = {os.path.basename(p): p for pattern in ("images/*", "images_*/images/*", "images_*/*")
             for p in glob.glob(os.path.join(root, pattern)) if p.lower().endswith(".png")}
    split_of = {}
    for split, name in (("train", "train_val_list.txt"), ("test", "test_list.txt")):
        if os.path.isfile(os.path.join(root, name)):
            split_of.update({line.strip(): split for line in open(os.path.join(root, name)) if line.strip()})
    for line, r in enumerate(rows, 2):
        findings = {f.strip() for f in r["Finding Labels"].split("|")} - {"No Finding", ""}
        unknown = findings - set(NIH_LABELS)
        if unknown:
            raise DataError(f"{entry}, line {line}: unknown finding '{sorted(unknown)[0]}' (expected {', '.join(NIH_LABELS)}, No Finding)")
        name = r["Image Index"]
        table.rows.append(Row(name, files.get(name, os.path.join(root, "images", name)), [int(k in findings) for k in NIH_LABELS],
                           int(bool(findings)), split_of.get(name), r["Patient ID"]))
    bbox = os.path.join(root, "BBox_List_2017.csv")
    if os.path.isfile(bbox):  # its header 'Bbox [x,y,w,h]' spans four columns, so the columns are read by place
        with open(bbox, newline="", encoding="utf-8-sig") as f:
            for line, r in enumerate(list(csv.reader(f))[1:], 2):
                if len(r) >= 6 and r[2].strip():
                    x, y, w, h = (number(v, bbox, line, name) for v, name in zip(r[2:6], ("x", "y", "w", "h")))
                    table.boxes.append((r[0], {"Infiltrate": "Infiltration"}.get(r[1], r[1]), x, y, x + w, y + h,
                                        f"{bbox}, line {line}"))
    return table


def read_chexpert(root, uncertain="zeros", views="frontal", **_):
    """CheXpert: train.csv for training, valid.csv (radiologist-labelled) as the test split; frontal views."""
    table = Table("chexpert", list(CHEXPERT_LABELS))
    lateral = 0
    for name, split in (("train.csv", "train"), ("valid.csv", "test")):
        path = os.path.join(root, name)
        _, rows = read_csv(path, ["Path", "Frontal/Lateral", "No Finding"] + CHEXPERT_LABELS)
        for line, r in enumerate(rows, 2):
            if views == "frontal" and r["Frontal/Lateral"] != "Frontal":
                lateral += 1
                continue
            rel = r["Path"]  # starts with the dataset's own folder (CheXpert-v1.0-small/train/...), whatever it is called now
            file = os.path.join(root, rel.split("/", 1)[-1])
            patient = re.search(r"patient\d+", rel)
            local = [label_value(table, r[c], path, line, c, uncertain) for c in CHEXPERT_LABELS]
            normal = label_value(table, r["No Finding"], path, line, "No Finding")
            table.rows.append(Row(rel, file, local, 1 - normal, split, patient.group() if patient else rel))
    if lateral:
        table.notes.append(f"{lateral} lateral views not used (frontal only; --views all to use them)")
    return table


def read_class_folders(root, **_):
    """torchvision's ImageFolder layout: one class per folder, with or without train/val/test folders above.
    Names that start with a dot (.ipynb_checkpoints/, .DS_Store) are hidden: never a class, never an image."""
    split_dirs = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    bases = [(os.path.join(root, s), s) for s in split_dirs] or [(root, None)]
    hidden = [os.path.join(base, c) for base, _ in bases for c in os.listdir(base) if c.startswith(".")]
    classes = sorted({c for base, _ in bases for c in os.listdir(base)
                      if os.path.isdir(os.path.join(base, c)) and not c.startswith(".")})
    normal = [c for c in classes if c.lower().strip() in NORMAL_NAMES]
    table = Table("folders", [c for c in classes if c not in normal])
    if not table.label_names:
        raise DataError(f"{root}: no class folder besides the normal class ({', '.join(classes) or 'none found'})")
    ignored = []
    for base, split in bases:
        for c in classes:
            folder = os.path.join(base, c)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if name.startswith("."):
                    hidden.append(os.path.join(folder, name))
                    continue
                if not is_image_file(os.path.join(folder, name)):
                    ignored.append(os.path.join(folder, name))
                    continue
                image_id = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                table.rows.append(Row(image_id, os.path.join(folder, name), [int(c == k) for k in table.label_names],
                                   int(c not in normal), split, image_id))
    table.notes.append(f"class folders: {', '.join(normal) or 'none'} normal; local labels {', '.join(table.label_names)}"
                       + (f"; {len(hidden)} hidden files and folders ignored, e.g. {hidden[0]}" if hidden else "")
                       + (f"; {len(ignored)} files that are not images ignored, e.g. {ignored[0]}" if ignored else ""))
    return table


def read_csv_layout(path, uncertain="zeros", boxes=None, **_):
    """Any dataset by a CSV: a path column (relative to the CSV) and one column per label."""
    header, rows = read_csv(path, ["path"])
    special = {"path", "split", "No finding", "image_id", "patient_id"}
    table = Table("csv", [c for c in header if c not in special and c])
    if not table.label_names:
        raise DataError(f"{path}: no label columns (every column but path, split, image_id, patient_id and 'No finding' is a label)")
    base, outside = os.path.dirname(os.path.abspath(path)), []
    for line, r in enumerate(rows, 2):
        split = r.get("split", "").strip() or None
        if split not in (None, "train", "val", "test"):
            raise DataError(f"{path}, line {line}: column 'split' holds '{split}', expected train, val or test")
        local = [label_value(table, r[c], path, line, c, uncertain) for c in table.label_names]
        abnormal = 1 - label_value(table, r["No finding"], path, line, "No finding") if "No finding" in header else None
        if not r["path"].strip():
            raise DataError(f"{path}, line {line}: column 'path' is empty")
        image_id = r.get("image_id") or r["path"]
        file = os.path.normpath(os.path.join(base, r["path"]))
        if os.path.isabs(r["path"]) or os.path.relpath(file, base).split(os.sep)[0] == os.pardir:
            outside.append(r["path"])
        table.rows.append(Row(image_id, file, local, abnormal, split, r.get("patient_id") or image_id))
    if outside:  # allowed (a set may point at images it shares with another), but never unsaid
        table.notes.append(f"{len(outside)} paths in {path} lie outside its folder (absolute, or climbing out with ..), "
                           f"e.g. {outside[0]}")
    boxes = boxes or os.path.join(base, "boxes.csv")
    if os.path.isfile(boxes):
        box_header, box_table = read_csv(boxes, ["label", "x_min", "y_min", "x_max", "y_max"])
        key = "image_id" if "image_id" in box_header else "path"
        if key not in box_header:
            raise DataError(f"{boxes}: missing column 'path' (or 'image_id')")
        by_path = {os.path.normpath(r.path): r.image_id for r in table.rows}
        table.boxes = [(b[0] if key == "image_id" else by_path.get(os.path.normpath(os.path.join(base, b[0])), b[0]), *b[1:])
                       for b in box_rows(boxes, box_table, key, "label")]
    return table


# ---------------------------------------------------------------------------------------------- path -> Sources

def detect_layout(path):
    """The reader for what path holds, or a DataError saying what was expected."""

    def has(*names):
        return os.path.isfile(os.path.join(path, *names))

    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return read_csv_layout
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or folder" if not os.path.exists(path) else f"{path}: not a folder or a .csv file")
    if has("annotations", "image_labels_train.csv"):
        return read_vindr
    if has("Data_Entry_2017.csv") or has("Data_Entry_2017_v2020.csv"):
        return read_nih
    if has("train.csv"):
        return read_chexpert if "Path" in read_csv(os.path.join(path, "train.csv"))[0] else read_kaggle
    if any(os.path.isdir(os.path.join(path, d)) for d in os.listdir(path)):
        return read_class_folders
    raise DataError(f"{path}: not a dataset layout this project reads (VinDr-CXR, VinBigData, NIH ChestX-ray14, "
                    "CheXpert, class folders, or a .csv file; README, 'Data')")


def load_sources(path, readers="majority", uncertain="zeros", views="frontal", boxes=None, test_fraction=0.2):
    """Reads a dataset in any layout above -> {'train': Source, 'test': Source}, files checked, boxes matched."""
    table = detect_layout(path)(path, readers=readers, uncertain=uncertain, views=views, boxes=boxes)
    if table.blank or table.uncertain:
        table.notes.append(f"{table.blank} blank label cells read as 0, {table.uncertain} uncertain (-1) read as "
                           f"{int(uncertain == 'ones')} (--uncertain {uncertain})")
    unsplit = {r.group for r in table.rows if r.split is None}
    if unsplit:  # by patient where patients are known, so that no patient is in both train and test
        table.notes.append(f"no test split given for {len(unsplit)} patients/images: {test_fraction:.0%} held out by a hash of their id")
    sources = {}
    for split in ("train", "test"):
        rows = [r for r in table.rows if split_of(r, test_fraction) == split]
        if not rows:
            raise DataError(f"{path}: the {split} split is empty")
        missing = [r.path for r in rows if not os.path.isfile(r.path)]
        if missing:
            raise DataError(f"{missing[0]}: listed in {path} but no such file ({len(missing)} missing in all)")
        local = np.array([r.local for r in rows], np.uint8).reshape(len(rows), -1)
        abnormal = np.array([local[n].any() if r.abnormal is None else r.abnormal for n, r in enumerate(rows)], np.uint8)
        index, label_index = {r.image_id: n for n, r in enumerate(rows)}, {c: k for k, c in enumerate(table.label_names)}
        mine = [b for b in table.boxes if b[0] in index]
        other = sorted({b[1] for b in mine} - set(label_index) - {"No finding"})
        notes = [f"{split}: boxes of {len(other)} class(es) outside the label set not used: {', '.join(other)}"] if other else []
        boxes = [(index[b[0]], label_index[b[1]], *b[2:6]) for b in mine if b[1] in label_index]
        origins = [b[6] for b in mine if b[1] in label_index]
        frames = np.array([table.frames.get(r.image_id, (0, 0)) for r in rows], np.float32).reshape(-1, 2)
        sources[split] = Source(table.name, split, [r.image_id for r in rows], [r.path for r in rows], table.label_names,
                                local, abnormal, np.array(boxes, np.float32).reshape(-1, 6), origins, frames,
                                [r.group for r in rows], np.array([r.split == "val" for r in rows]), notes)
    sources["train"].notes = table.notes + sources["train"].notes  # the layout's notes, said once
    return sources


def split_of(row, test_fraction):
    """'train' or 'test': the layout's own split (its validation images train), else a hash of the patient."""
    if row.split in ("train", "val", "test"):
        return "test" if row.split == "test" else "train"
    return "test" if hash_fraction(row.group) < test_fraction else "train"


def load_source(path, split, **options):
    return load_sources(path, **options)[split]
