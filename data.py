"""
Chest X-ray data for MLCAK: the layouts people download, read as they come, decoded once into a cache.

    load_sources(path)  -> {'train': Source, 'test': Source}   labels, boxes and patients, from any layout below
    build_cache(source) -> folder       each image decoded once, on every core, into a uint8 memory map
    XrayDataset(folder)                 (image, local targets, abnormal, index) from that cache
    validation_rows(ds, fraction)       the validation images, never the test split's
    overlap_notes(sets)                 the same image or patient in two splits (a leak), or twice in one

Layouts, told apart by what --data holds (README, "Data"):
    VinDr-CXR (PhysioNet)  annotations/image_labels_{train,test}.csv, annotations_{train,test}.csv, {train,test}/*.dicom
    VinBigData (Kaggle)    train.csv (a row per box per reader), train/<image_id>.{dicom,png,jpg}, train_meta.csv
    NIH ChestX-ray14       Data_Entry_2017*.csv, images*/, train_val_list.txt, test_list.txt, BBox_List_2017.csv
    CheXpert               train.csv and valid.csv (the test split) with Path, Frontal/Lateral and 14 observations
    class folders          ROOT/{train,val,test}/<CLASS>/*, or ROOT/<CLASS>/*; a class named normal is the normal class
    CSV                    a .csv: path, a column per label; optional No finding, split, image_id, patient_id; boxes.csv

Where a layout has no test (or validation) split, it is drawn by a hash of the patient (or image) id, the same on
every machine. Low-resolution images are not made here: mlcak.simulate_low_resolution makes them from HR batches.
"""

import csv
import glob
import hashlib
import json
import os
import re
import time
from collections import namedtuple
from dataclasses import dataclass, field
from multiprocessing import Pool

import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

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
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CACHE_VERSION = 2
# transfer syntaxes that pydicom cannot decode on its own, and what to install for them
PLUGIN_HINTS = {
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",  # JPEG 2000
}


class DataError(Exception):
    """Bad input: the message is one line that names the path, column or label at fault."""


class NotReady(Exception):
    """Another process is still making the data or the cache that this one would read."""


def hash_fraction(key):
    """A number in [0, 1) fixed by the string alone (the same on every machine), for deterministic splits."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2 ** 32


# ---------------------------------------------------------------------------------------------- label sources

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
    frames: np.ndarray    # (N, 2) rows and columns of the pixels the boxes are given in; 0 = the image's own size
    groups: list          # patient ids where known, else image ids: what a split never cuts through
    val: np.ndarray       # (N,) bool: the layout's own validation images (a val/ folder, split=val)
    notes: list = field(default_factory=list)  # what the reader should be told (counts of choices made)


# one image as a layout reader finds it: abnormal None = derived from the local labels; split None = not given
Row = namedtuple("Row", "image_id path local abnormal split group")


@dataclass
class Table:
    """What every layout reader returns: the Rows of all splits, and boxes (image_id, label name, x_min, y_min,
    x_max, y_max) in the pixels of the original image (or of its frame, see frames)."""
    name: str
    label_names: list
    rows: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    frames: dict = field(default_factory=dict)  # image_id -> (rows, columns) of the box coordinates
    notes: list = field(default_factory=list)
    blank: int = 0      # label cells left blank, read as 0
    uncertain: int = 0  # label cells holding -1, read by the --uncertain policy


def read_csv(path, required=()):
    """(header, rows as dicts); the header read from the file itself (a UTF-8 byte-order mark is fine)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
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
        table.blank += v == ""
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


def box_rows(path, rows, id_column="image_id", label_column="class_name"):
    """(image_id, label, x_min, y_min, x_max, y_max) of the rows that have a box (a 'No finding' row has none)."""
    corners = ("x_min", "y_min", "x_max", "y_max")
    return [(r[id_column], r[label_column], *(float(r[c]) for c in corners)) for r in rows if r[corners[0]].strip()]


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
        table.frames = {r["image_id"]: (float(r["dim0"]), float(r["dim1"])) for r in read_csv(meta, ["image_id", "dim0", "dim1"])[1]}
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
            for r in list(csv.reader(f))[1:]:
                if len(r) >= 6 and r[2].strip():
                    x, y, w, h = map(float, r[2:6])
                    table.boxes.append((r[0], {"Infiltrate": "Infiltration"}.get(r[1], r[1]), x, y, x + w, y + h))
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
    """torchvision's ImageFolder layout: one class per folder, with or without train/val/test folders above."""
    split_dirs = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    bases = [(os.path.join(root, s), s) for s in split_dirs] or [(root, None)]
    classes = sorted({c for base, _ in bases for c in os.listdir(base) if os.path.isdir(os.path.join(base, c))})
    normal = [c for c in classes if c.lower().strip() in NORMAL_NAMES]
    table = Table("folders", [c for c in classes if c not in normal])
    if not table.label_names:
        raise DataError(f"{root}: no class folder besides the normal class ({', '.join(classes) or 'none found'})")
    ignored = []
    for base, split in bases:
        for c in classes:
            folder = os.path.join(base, c)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(os.path.join(folder, name))
                    continue
                image_id = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                table.rows.append(Row(image_id, os.path.join(folder, name), [int(c == k) for k in table.label_names],
                                   int(c not in normal), split, image_id))
    table.notes.append(f"class folders: {', '.join(normal) or 'none'} normal; local labels {', '.join(table.label_names)}"
                       + (f"; {len(ignored)} files that are not images ignored, e.g. {ignored[0]}" if ignored else ""))
    return table


def read_csv_layout(path, uncertain="zeros", boxes=None, **_):
    """Any dataset by a CSV: a path column (relative to the CSV) and one column per label."""
    header, rows = read_csv(path, ["path"])
    special = {"path", "split", "No finding", "image_id", "patient_id"}
    table = Table("csv", [c for c in header if c not in special and c])
    if not table.label_names:
        raise DataError(f"{path}: no label columns (every column but path, split, image_id, patient_id and 'No finding' is a label)")
    base = os.path.dirname(os.path.abspath(path))
    for line, r in enumerate(rows, 2):
        split = r.get("split", "").strip() or None
        if split not in (None, "train", "val", "test"):
            raise DataError(f"{path}, line {line}: column 'split' holds '{split}', expected train, val or test")
        local = [label_value(table, r[c], path, line, c, uncertain) for c in table.label_names]
        abnormal = 1 - label_value(table, r["No finding"], path, line, "No finding") if "No finding" in header else None
        image_id = r.get("image_id") or r["path"]
        table.rows.append(Row(image_id, os.path.join(base, r["path"]), local, abnormal, split, r.get("patient_id") or image_id))
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


def detect_layout(path):
    """The reader for what path holds, or a DataError saying what was expected."""
    has = lambda *names: os.path.isfile(os.path.join(path, *names))
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
        in_split = lambda r: r.split == split or (split == "train" and r.split == "val") or (
            r.split is None and (hash_fraction(r.group) < test_fraction) == (split == "test"))
        rows = [r for r in table.rows if in_split(r)]
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
        boxes = [(index[b[0]], label_index[b[1]], *b[2:]) for b in mine if b[1] in label_index]
        frames = np.array([table.frames.get(r.image_id, (0, 0)) for r in rows], np.float32).reshape(-1, 2)
        sources[split] = Source(table.name, split, [r.image_id for r in rows], [r.path for r in rows], table.label_names,
                                local, abnormal, np.array(boxes, np.float32).reshape(-1, 6), frames,
                                [r.group for r in rows], np.array([r.split == "val" for r in rows]), notes)
    sources["train"].notes[:0] = table.notes  # said once
    return sources


def load_source(path, split, **options):
    return load_sources(path, **options)[split]


# ---------------------------------------------------------------------------------------------- decoding

def read_dicom(path):
    """
    A radiograph as float32 in [0, 1], as it should look on screen (lungs dark, bone bright): stored values ->
    modality LUT (or rescale) -> VOI LUT, or window centre/width (linear, c +- w/2), or else the image's own
    min..max -> MONOCHROME1 inverted last, after the windowing that is defined on its stored polarity.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in ds.file_meta:  # an older file without a meta header: the encoding it was read in
            implicit, little = ds.original_encoding
            syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
            ds.file_meta.TransferSyntaxUID = syntax
        syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception as err:
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as err:
        hint = f"; install a decoder: pip install {PLUGIN_HINTS[syntax]}" if syntax in PLUGIN_HINTS else ""
        raise DataError(f"{path}: cannot decode pixel data ({type(err).__name__}: {str(err).splitlines()[0]}){hint}") from None
    image = apply_modality_lut(pixels, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        image = apply_voi_lut(image, ds, prefer_lut=True)
        low, high = image.min(), image.max()
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
        centre, width = first(ds.WindowCenter), first(ds.WindowWidth)
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = image.min(), image.max()
    image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        image = 1 - image
    return image.astype(np.float32)


def read_image(path):
    """
    DICOM (by extension or content), or PNG/JPEG, as float32 in [0, 1]. An 8-bit image is display-ready (/ 255); a
    16-bit one often holds 10 or 12-bit values, so like a DICOM without a window it is spread over its own range.
    """
    if path.lower().endswith((".dcm", ".dicom")):
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            if im.mode.startswith(("I", "F")):
                image = np.asarray(im, np.float32)
                return (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
            return np.asarray(im.convert("L"), np.float32) / 255.0
    except Exception as err:
        if pydicom.misc.is_dicom(path):
            return read_dicom(path)
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def resize_uint8(image, size):
    """Squashes to size x size (antialiased bicubic; the aspect ratio is not kept) and quantizes to uint8."""
    resized = Image.fromarray(image, mode="F").resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return np.clip(np.asarray(resized) * 255 + 0.5, 0, 255).astype(np.uint8)


def _decode_one(job):
    n, path, size = job
    try:
        image = read_image(path)
        return n, resize_uint8(image, size), image.shape, None
    except Exception as err:  # one bad file must never stop a long build: it is reported by name instead
        return n, None, None, str(err) if isinstance(err, DataError) else f"{path}: {type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------- cache

def cache_key(source, size):
    """Changes when the files, their labels, the size or the format change, so a stale cache is never reused."""
    h = hashlib.sha1(json.dumps([CACHE_VERSION, source.name, source.split, size, source.label_names,
                                 source.image_ids, source.groups]).encode())
    for p in source.paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    for array in (source.local, source.abnormal, source.boxes, source.frames, source.val):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def progress_line(what, done, total, start):
    rate = done / max(time.time() - start, 1e-9)
    return f"{what}: {done}/{total} ({rate:.0f}/s, ETA {(total - done) / max(rate, 1e-9):.0f}s)"


def cache_folder(source, size=224, cache_root=None):
    key = cache_key(source, size)[:12]
    return os.path.join(cache_root or os.path.join(DEFAULT_DATA, "cache"), f"{source.name}-{source.split}-{size}-{key}")


def damage(folder, n, size):
    """Why the arrays in folder cannot be trusted (truncated, wrong shape, unreadable), or None when they can."""
    expected = {"images.npy": (n, size, size), "sizes.npy": (n, 2), "done.npy": (n,)}
    for name, shape in expected.items():
        if name == "done.npy" and not os.path.isfile(os.path.join(folder, name)):
            continue
        try:
            found = np.load(os.path.join(folder, name), mmap_mode="r").shape
        except Exception as err:
            return f"{name}: {type(err).__name__}: {err}"
        if found != shape:
            return f"{name} holds {found}, expected {shape}"
    return None


def build_cache(source, size=224, cache_root=None, workers=None, verbose=True, create=True):
    """
    Decodes every image of a Source once (all cores), squashed to size x size, into <folder>/images.npy (uint8,
    memory-mapped) with targets.npz (labels, boxes, frames, a digest of each image's pixels) and meta.json.
    Re-running after an interrupt continues where it stopped; unreadable files are skipped and listed in
    skipped.txt; a damaged cache is said and rebuilt. create=False waits for another process's build
    (NotReady until it is complete). Returns the folder.
    """
    folder, N = cache_folder(source, size, cache_root), len(source.paths)
    complete = os.path.isfile(os.path.join(folder, "meta.json"))
    problem = damage(folder, N, size) if complete or os.path.isfile(os.path.join(folder, "done.npy")) else None
    if complete and not problem:
        return folder
    if not create:
        raise NotReady(folder)
    if problem:
        print(f"cache: {folder} is damaged ({problem}); rebuilding it", flush=True)
        for name in ("meta.json", "done.npy"):
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    os.makedirs(folder, exist_ok=True)
    image_file, done_file, sizes_file = (os.path.join(folder, f) for f in ("images.npy", "done.npy", "sizes.npy"))
    fresh = not os.path.isfile(done_file)
    images = np.lib.format.open_memmap(image_file, mode="w+" if fresh else "r+", dtype=np.uint8, shape=(N, size, size))
    sizes = np.lib.format.open_memmap(sizes_file, mode="w+" if fresh else "r+", dtype=np.int32, shape=(N, 2))
    done = np.zeros(N, bool) if fresh else np.load(done_file)
    todo = [(n, source.paths[n], size) for n in np.flatnonzero(~done)]
    errors, start, last = {}, time.time(), 0.0

    def save_progress():  # pixels reach the disk before the flags that say they are there
        images.flush()
        sizes.flush()
        np.save(done_file + ".tmp.npy", done)
        os.replace(done_file + ".tmp.npy", done_file)

    if verbose and not fresh:
        print(f"cache: resuming {folder}, {int(done.sum())} of {N} images already there")
    try:
        with Pool(workers or os.cpu_count()) as pool:
            for count, (n, pixels, shape, error) in enumerate(pool.imap_unordered(_decode_one, todo, chunksize=8), 1):
                if error:
                    errors[n] = error
                else:
                    images[n], sizes[n], done[n] = pixels, shape, True
                if time.time() - last > 2 or count == len(todo):
                    save_progress()
                    last = time.time()
                    if verbose:
                        print("\r" + progress_line(f"cache {source.split}", count, len(todo), start), end="", flush=True)
    finally:
        save_progress()
        if verbose and todo:
            print()
    skipped = [errors[n] for n in sorted(errors)]
    with open(os.path.join(folder, "skipped.txt"), "w") as f:
        f.writelines(line + "\n" for line in skipped)
    if skipped and verbose:
        print(f"cache: {len(skipped)} unreadable files skipped, listed in {folder}/skipped.txt; first: {skipped[0]}")
    digests = np.array([hashlib.sha1(images[n].tobytes()).hexdigest()[:16] if done[n] else "" for n in range(N)])
    frames = np.where(source.frames > 0, source.frames, sizes)  # boxes in the image's own pixels unless told otherwise
    np.savez(os.path.join(folder, "targets.npz"), local=source.local, abnormal=source.abnormal, boxes=source.boxes,
             frames=frames, val=source.val, usable=done, digests=digests)
    meta = dict(version=CACHE_VERSION, source=source.name, split=source.split, size=size, label_names=source.label_names,
                image_ids=source.image_ids, groups=source.groups, skipped=len(skipped))
    with open(os.path.join(folder, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(folder, "meta.json.tmp"), os.path.join(folder, "meta.json"))  # marks the cache complete
    return folder


class XrayDataset(torch.utils.data.Dataset):
    """
    Items from a cache folder: (image (1, S, S) float32 in [0, 1], local targets (L,) float32, abnormal 0/1, index).
    indices picks a subset of the cache rows (for example a validation split); skipped files are never included.
    boxes(index) gives that image's finding boxes in cache pixels.
    """

    def __init__(self, folder, indices=None):
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        if self.meta.get("version") != CACHE_VERSION:
            raise DataError(f"{folder}: a cache of another version of data.py; delete it and run train.py to rebuild it")
        problem = damage(folder, len(self.meta["image_ids"]), self.meta["size"])
        if problem:
            raise DataError(f"{folder}: damaged cache ({problem}); delete the folder and run train.py to rebuild it")
        self.label_names, self.image_ids, self.groups = self.meta["label_names"], self.meta["image_ids"], self.meta["groups"]
        targets = np.load(os.path.join(folder, "targets.npz"))
        self.local, self.abnormal, self._boxes = targets["local"], targets["abnormal"], targets["boxes"]
        self.frames, self.val, self.digests = targets["frames"], targets["val"], targets["digests"]
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        usable = targets["usable"]
        self.indices = np.flatnonzero(usable) if indices is None else np.asarray([i for i in indices if usable[i]], np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        n = int(self.indices[i])
        return self.image(n), torch.from_numpy(self.local[n].astype(np.float32)), int(self.abnormal[n]), n

    def image(self, n):
        """Cache row n as a (1, S, S) float32 tensor in [0, 1]."""
        return torch.from_numpy(self.images[n].astype(np.float32) / 255.0)[None]  # (S, S) -> (1, S, S)

    def boxes(self, n):
        """(K, 5) float32: label index, x_min, y_min, x_max, y_max, scaled from the frame's to cache pixels."""
        rows = self._boxes[self._boxes[:, 0] == n][:, 1:].copy()
        S, (h, w) = self.meta["size"], self.frames[n]
        rows[:, [1, 3]] *= S / w
        rows[:, [2, 4]] *= S / h
        return rows


def validation_rows(dataset, fraction):
    """
    Cache rows of the training images held out for validation: the layout's own (a val/ folder, split=val), or
    the patients (images) whose salted hash falls below fraction. The salt makes this draw independent of the
    test split's, which used the unsalted hash, so validation is a fraction of the training images, never empty
    by construction: it can only be empty when the training split is too small, which train.py says.
    """
    rows = dataset.indices
    if dataset.val[rows].any():
        return rows[dataset.val[rows]]
    return np.array([n for n in rows if hash_fraction("validation/" + dataset.groups[n]) < fraction], np.int64)


def overlap_notes(sets):
    """One line for each pair of splits that share an image (the same pixels) or a patient, and for repeats
    within a split. sets: {name: XrayDataset}, e.g. train, val and test."""
    notes, seen = [], {}
    for name, ds in sets.items():
        digests = [ds.digests[n] for n in ds.indices]
        repeats = len(digests) - len(set(digests))
        if repeats:
            notes.append(f"{name}: {repeats} images repeat another image of {name} (the same pixels)")
        seen[name] = (dict(zip(digests, (ds.image_ids[n] for n in ds.indices))), {ds.groups[n] for n in ds.indices}, ds)
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(seen[a][0]) & set(seen[b][0]))
            if shared:
                d = shared[0]
                notes.append(f"leak: {len(shared)} images of {b} are also in {a} (the same pixels), "
                             f"e.g. {seen[b][0][d]} = {seen[a][0][d]}")
            patients = sorted((seen[a][1] & seen[b][1]) - set(seen[a][0].values()) - set(seen[b][0].values()))
            if patients:
                notes.append(f"leak: {len(patients)} patients have images in both {a} and {b}, e.g. {patients[0]}")
    return notes
