"""Small datasets written by the tests themselves, in each layout layouts.py reads (a fresh clone tests itself)."""

import csv
import os

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from machinery.layouts import LOCAL_LABELS

RAMP = np.tile(np.linspace(0, 4000, 16), (8, 1)).round()  # 8 x 16, stored values 0 .. 4000


def write_dicom(path, pixels, photometric="MONOCHROME2", syntax=ExplicitVRLittleEndian, file_meta=True, **tags):
    """A 12-bit DICOM of pixels (H, W), or (H, W, 3) for RGB; file_meta=False writes it as older archives did,
    without preamble and meta header."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if photometric == "RGB" else 1), photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0  # R, G, B of each pixel side by side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    else:  # a compressed syntax: encapsulated bytes that only a decoder plugin could read
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
        ds["PixelData"].VR = "OB"
    if file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, "1.2.3.4"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True)  # no preamble, no meta: implicit VR little endian
    return path


def write_rows(path, header, rows, bom=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        csv.writer(f).writerows([header] + rows)


def xray(seed, positive, size=48):
    """A tiny image: noise, plus a bright square for a positive case (so a short run has something to learn)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(90, 20, (size, size))
    if positive:
        image[size // 4:size // 2, size // 4:size // 2] += 100
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(path, seed, positive, size=48):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(xray(seed, positive, size)).save(path)
    return path


def class_folders(root, splits=("train", "test"), per_class=12, normal="NORMAL", junk=True):
    """ROOT/<split>/<CLASS>/*.png (or ROOT/<CLASS>/* when splits is empty): NORMAL, PNEUMONIA, COVID."""
    for s, split in enumerate(splits or [""]):
        for c, name in enumerate((normal, "PNEUMONIA", "COVID")):
            for n in range(per_class):
                write_image(os.path.join(root, split, name, f"{name.lower()}-{split}-{n}.png"), 1000 * s + 100 * c + n, c > 0)
        if junk:
            open(os.path.join(root, split, normal, ".DS_Store"), "wb").close()
    return str(root)


NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


def nih_folder(root, patients=12, lists=True):
    """NIH ChestX-ray14 as downloaded: Data_Entry_2017_v2020.csv, images_00N/images/*.png, the official split
    lists and BBox_List_2017.csv with its four-column header and 'Infiltrate'."""
    findings = ["No Finding", "Effusion", "Infiltration|Effusion", "Mass", "No Finding", "Cardiomegaly"]
    rows, test = [], []
    for p in range(patients):
        for k in range(2):  # two images of each patient
            name = f"{p:08d}_{k:03d}.png"
            label = findings[(p + k) % len(findings)]
            write_image(os.path.join(root, f"images_{1 + p % 2:03d}", "images", name), 10 * p + k, label != "No Finding")
            rows.append([name, label, k, p, 50, "M", "PA", 48, 48, 0.143, 0.143])
            if p % 4 == 0:
                test.append(name)
    write_rows(os.path.join(root, "Data_Entry_2017_v2020.csv"), NIH_HEADER, rows)
    if lists:
        with open(os.path.join(root, "test_list.txt"), "w") as f:
            f.write("\n".join(test) + "\n")
        with open(os.path.join(root, "train_val_list.txt"), "w") as f:
            f.write("\n".join(r[0] for r in rows if r[0] not in test) + "\n")
    with open(os.path.join(root, "BBox_List_2017.csv"), "w") as f:
        f.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        f.write("00000001_001.png,Effusion,4.5,6.0,10.0,12.0,,,\n")
        f.write("00000008_000.png,Infiltrate,8,8,20,16,,,\n")  # a test image; NIH's spelling of Infiltration
    return str(root)


CHEXPERT = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]


def chexpert_folder(parent, name="CheXpert-v1.0-small", patients=16):
    """CheXpert as downloaded: Path relative to the parent folder, frontal and lateral views, 1/0/-1/blank."""
    root = os.path.join(parent, name)
    for csv_name, split, first in (("train.csv", "train", 1), ("valid.csv", "valid", 64541)):
        rows = []
        for p in range(first, first + patients):
            for view, kind in (("view1_frontal.jpg", "Frontal"), ("view2_lateral.jpg", "Lateral")):
                rel = f"{name}/{split}/patient{p:05d}/study1/{view}"
                sick = p % 3
                labels = ["1.0" if not sick else ""] + [""] * 13
                labels[CHEXPERT.index("Edema")] = {0: "0.0", 1: "1.0", 2: "-1.0"}[sick]
                labels[CHEXPERT.index("Cardiomegaly")] = "1.0" if sick and p % 2 else ""
                write_image(os.path.join(parent, rel), p, sick > 0)
                rows.append([rel, "Female", 60, kind, "AP" if kind == "Frontal" else ""] + labels)
        write_rows(os.path.join(root, csv_name), ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT, rows)
    return root


def vindr_folder(root, test_other="Other disease"):
    """A hand-made VinDr-CXR folder: two training images read by three readers, one test image."""
    globals_train = ["COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]
    globals_test = globals_train[:4] + [test_other, "No finding"]
    L = LOCAL_LABELS

    def row(ids, positives, no_finding):
        return ids + [int(n in positives) for n in L] + [0, 0, 0, 0, 0, no_finding]

    write_rows(root / "annotations" / "image_labels_train.csv", ["image_id", "rad_id"] + L + globals_train, [
        row(["a", "R1"], {"Cardiomegaly", "Nodule/Mass"}, 0),
        row(["a", "R2"], {"Cardiomegaly"}, 0),
        row(["a", "R3"], set(), 1),
        row(["b", "R1"], {"ILD"}, 0),  # one reader of three: positive for 'any', negative for 'majority'
        row(["b", "R4"], set(), 1),
        row(["b", "R5"], set(), 0),  # a reader who says neither finding nor 'No finding'
    ])
    write_rows(root / "annotations" / "image_labels_test.csv", ["image_id"] + L + globals_test,
               [row(["t"], {"Pleural effusion"}, 0)])
    box_header = ["class_name", "x_min", "y_min", "x_max", "y_max"]
    write_rows(root / "annotations" / "annotations_train.csv", ["image_id", "rad_id"] + box_header, [
        ["a", "R1", "Cardiomegaly", 2, 1, 6, 4], ["a", "R3", "No finding", "", "", "", ""],
        ["b", "R4", "Cardiomegally", 1, 2, 3, 4]])  # a misspelt class: not a box, but not dropped silently
    write_rows(root / "annotations" / "annotations_test.csv", ["image_id"] + box_header,
               [["t", "Pleural effusion", 0, 5, 4, 7]])
    for split, ids in (("train", "ab"), ("test", "t")):
        os.makedirs(root / split, exist_ok=True)
        for i in ids:
            write_dicom(root / split / f"{i}.dicom", RAMP)
    return root


def entries(role="teacher", res=64, labels=("COVID", "PNEUMONIA"), **more):
    """The entries besides the weights that train.py writes into a checkpoint, for checkpoints the tests make."""
    data = dict(path="", train_cache="", test_cache="")
    return dict(dict(role=role, res=res, kd=role == "mlcak", norm=[0.5, 0.25], label_names=list(labels), epoch=1, args={},
                     data=data), **more)


def call(capsys, main, *argv):
    """(exit code, stdout, stderr) of a command line's cli(argv) (train.cli, evaluate.cli), run in this process."""
    try:
        code = main(list(argv))
    except SystemExit as exit:  # the parser's errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err
