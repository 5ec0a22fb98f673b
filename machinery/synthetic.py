"""
The synthetic default: chest radiograph-like phantoms with 22 findings, written as a VinDr-CXR folder (DICOMs,
image_labels_*.csv, annotations_*.csv, three readers per training image), so that a fresh clone trains, and tests
itself, without credentialed data. layouts.py reads the result like the real dataset; it never imports this file.

    python -m machinery.synthetic data/synthetic                     # what train.py does on first use without --data
    python -m machinery.synthetic data/synthetic-5000 --n-test 5000  # the same training images, 5,000 test images
    python -m machinery.synthetic --survival                         # what each finding keeps at 112, 56 and 28

The 22 findings come in three tiers (TIERS) by what of them survives at the paper's resolutions: coarse ones all of
it, subtle ones less at each step down, fine ones (a few pixels wide, with zero local mean) are there at 112 and
mostly gone by 56. So what resolution removes shows: a student at 28 has less to learn from than one at 112, which
has less than the teacher at 224, and one can measure where distillation helps and where it cannot.
It is synthetic: results on it are not clinical results.
"""

import csv
import hashlib
import json
import os
import time

import numpy as np
import pydicom
import torch
from PIL import Image

from machinery.layouts import GLOBAL_LABELS, LOCAL_LABELS
from machinery.runtime import Lock, NotReady, WorkerPool, progress_line
from mlcak import simulate_low_resolution

VERSION = 3  # of the generator: a change of drawing makes a new set (3: every tier graded over 112, 56 and 28)

RESOLUTIONS = (112, 56, 28)  # the paper's student resolutions
# The tiers, the one definition of each: the share of what a finding changes in the image that survives at each of
# RESOLUTIONS (survival(), the mean over four images) must lie in these (low, high) ranges, and fall from each
# resolution to the next for subtle and fine findings. tests/test_synthetic.py holds every finding to its tier.
TIERS = {"coarse": {112: (0.9, 2), 56: (0.9, 2), 28: (0.9, 2)},  # shapes and shadows: resolution takes nothing
         "subtle": {112: (0.8, 2), 56: (0, 2), 28: (0.4, 0.7)},  # a local mean that survives, detail that does not
         "fine": {112: (0.6, 2), 56: (0, 0.5), 28: (0, 0.5)}}    # present at 112, mostly gone by 56
COARSE = {"Aortic enlargement", "Cardiomegaly", "Consolidation", "Edema", "Emphysema", "Lung Opacity",
          "Mediastinal shift", "Pleural effusion"}
SUBTLE = {"Atelectasis", "Enlarged PA", "Infiltration", "Lung cavity", "Nodule/Mass", "Pleural thickening",
          "Pulmonary fibrosis"}
FINE = {"Calcification", "Clavicle fracture", "ILD", "Lung cyst", "Other lesion", "Pneumothorax", "Rib fracture"}
U = 1 / 224  # one pixel at the teacher's resolution, in image fractions: fine findings are a few U wide
# the width (sigma, in U) of each finding drawn as dots or lines, and the period (in U) of each textured one
SIGMA = {"Calcification": 1.1, "Clavicle fracture": 1.0, "Lung cyst": 1.0, "Other lesion": 1.2, "Pneumothorax": 1.0,
         "Rib fracture": 0.9, "Nodule/Mass": 1.6, "Lung cavity": 1.3, "Pleural thickening": 1.4, "Pulmonary fibrosis": 1.3}
PERIOD = {"Atelectasis": 12, "Enlarged PA": 12, "Infiltration": 22, "ILD": 11}
# the share of each subtle finding's drawing that is a local mean (the rest is detail that averages away)
SUBTLE_MEAN = {"Atelectasis": 0.25, "Enlarged PA": 0.4, "Infiltration": 0.2, "Lung cavity": 0.25, "Nodule/Mass": 0.35,
               "Pleural thickening": 0.3, "Pulmonary fibrosis": 0.45}


def _ellipse(Y, X, cy, cx, ry, rx, soft=0.08):
    d = np.sqrt(((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2)
    return 1 / (1 + np.exp(np.clip((d - 1) / soft, -50, 50)))


def _segment(Y, X, y0, x0, y1, x1, width):
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((Y - y0) * dy + (X - x0) * dx) / (dy * dy + dx * dx), 0, 1)
    return np.exp(-(((Y - y0 - t * dy) ** 2 + (X - x0 - t * dx) ** 2) / width ** 2))


def _fine(d, sigma, dims=1, mean=0.0):
    """A structure of width sigma pixels at distance d (pixels), a difference of Gaussians as unsharp masking leaves
    small structures on a processed radiograph. With mean = 0 its local mean is zero, so averaging over 8 x 8
    pixels erases it; with 0 < mean < 1 that share of a plain Gaussian's mass survives (a subtle finding)."""
    return np.exp(-d ** 2 / (2 * sigma ** 2)) - (1 - mean) * 0.5 ** dims * np.exp(-d ** 2 / (8 * sigma ** 2))


def _textured(shape, texture, mean):
    """A subtle opacity: a smooth shape at `mean` of its contrast plus a fine texture (values in -1..1, period a
    few pixels) that averaging erases."""
    return shape * (mean + (1 - mean) * texture)


def synthetic_chest(rng, h, w, labels):
    """One chest radiograph-like image (float in [0, 1], bright = dense) with the given findings drawn in,
    and their boxes as (label, x_min, y_min, x_max, y_max) in image fractions."""
    # float32: half the memory traffic of float64 in the many whole-image operations below
    Y, X = np.meshgrid((np.arange(h, dtype=np.float32) + 0.5) / h, (np.arange(w, dtype=np.float32) + 0.5) / w, indexing="ij")
    dy, dx, s = rng.normal(0, 0.015), rng.normal(0, 0.015), rng.uniform(0.93, 1.05)  # pose and size
    # drawn first, so that the same seed gives the same image up to the findings drawn in (tests rely on it)
    exposure, quantum_noise = rng.uniform(0.8, 1.25), rng.normal(0, 0.012, (h, w))
    shift = rng.choice([-1, 1]) * 0.055 * ("Mediastinal shift" in labels)
    heart = rng.uniform(1.25, 1.4) if "Cardiomegaly" in labels else rng.uniform(0.9, 1.05)
    img = 0.05 + 0.40 * _ellipse(Y, X, 0.56 + dy, 0.5 + dx, 0.56 * s, 0.47 * s, soft=0.04)
    lungs, boxes = [], []
    for side in (-1, 1):
        cx = 0.5 + dx + side * 0.19 * s
        dome = 0.76 + dy - 0.07 * (1 - ((X - cx) / (0.16 * s)) ** 2)  # the hemidiaphragm bulges up into the lung
        lungs.append((_ellipse(Y, X, 0.47 + dy, cx, 0.33 * s, 0.15 * s, soft=0.05) * (Y < dome), cx))
    dark = 0.40 if "Emphysema" in labels else 0.30
    for lung, _ in lungs:
        img -= dark * lung
    mid = 0.5 + dx + shift
    img += 0.30 * _ellipse(Y, X, 0.61 + dy, mid + 0.05, 0.13 * s * heart, 0.15 * s * heart, soft=0.06)
    img += 0.24 * np.exp(-((X - mid) / 0.045) ** 8) * (Y > 0.08) * (Y < 0.66 + dy)  # mediastinum
    ribs = [0.17 + dy + k * 0.064 * s for k in range(9)]
    for y0 in ribs:
        img += 0.10 * np.exp(-((Y - y0 - 0.09 * ((X - 0.5 - dx) / 0.4) ** 2) / 0.012) ** 2) * (np.abs(X - mid) > 0.05)
    clavicles = [(0.17 + dy, 0.5 + dx + side * 0.04, 0.11 + dy, 0.5 + dx + side * 0.28) for side in (-1, 1)]
    for c in clavicles:
        img += 0.18 * _segment(Y, X, *c, 0.012)
    texture = rng.normal(0, 1, (12, 12)).astype(np.float32)
    img += 0.035 * np.asarray(Image.fromarray(texture, mode="F").resize((w, h), Image.BICUBIC))

    def lung_point():
        _, cx = lungs[rng.integers(2)]
        return rng.uniform(0.30, 0.62) + dy, cx + rng.uniform(-0.07, 0.07), cx

    for label in labels:
        a, r = rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2)  # each finding varies in contrast and size
        if label == "Aortic enlargement":
            cy, cx, ry = 0.26 + dy, mid + 0.06, 0.045 * r
            img += 0.22 * a * _ellipse(Y, X, cy, cx, ry, ry)
            box = (cx - ry, cy - ry, cx + ry, cy + ry)
        elif label in ("Atelectasis", "Consolidation", "Lung Opacity"):
            ry, rx, amp = {"Atelectasis": (0.022, 0.07, 0.3), "Consolidation": (0.08, 0.07, 0.25),
                           "Lung Opacity": (0.05, 0.05, 0.18)}[label]
            cy, cx, _ = lung_point()
            shape = _ellipse(Y, X, cy, cx, ry * r, rx * r, soft=0.15)
            if label == "Atelectasis":  # plate-like: a faint band of striations across it
                shape = _textured(shape, np.cos(2 * np.pi * X / (PERIOD[label] * U)), SUBTLE_MEAN[label])
            img += amp * a * shape
            box = (cx - rx * r, cy - ry * r, cx + rx * r, cy + ry * r)
        elif label in ("Nodule/Mass", "Calcification", "Other lesion", "Lung cavity", "Lung cyst"):
            count, spread, sigma, amp, ring = {  # ring: radius in pixels of a ring-shaped wall, 0 for a dot
                "Nodule/Mass": (5, 0.05, SIGMA[label], 0.5, 0), "Calcification": (10, 0.04, SIGMA[label], 0.9, 0),
                "Other lesion": (6, 0.03, SIGMA[label], 0.6, 0), "Lung cavity": (2, 0.04, SIGMA[label], 0.6, 5),
                "Lung cyst": (3, 0.05, SIGMA[label], 0.6, 3.5)}[label]
            cy, cx, _ = lung_point()
            pts = [(cy + rng.uniform(-spread, spread), cx + rng.uniform(-spread, spread)) for _ in range(count)]
            for py, px in pts:
                d = np.sqrt((Y - py) ** 2 + (X - px) ** 2) / U
                mean = SUBTLE_MEAN.get(label, 0.0)
                img += amp * a * (_fine(d - ring, sigma, mean=mean) if ring else _fine(d, sigma, dims=2, mean=mean))
            ys, xs = [p[0] for p in pts], [p[1] for p in pts]
            m = (ring + 4 * sigma + 1) * U
            box = (min(xs) - m, min(ys) - m, max(xs) + m, max(ys) + m)
        elif label == "Cardiomegaly":
            cy, cx, ry, rx = 0.61 + dy, mid + 0.05, 0.13 * s * heart, 0.15 * s * heart
            box = (cx - rx, cy - ry, cx + rx, cy + ry)
        elif label in ("Clavicle fracture", "Rib fracture"):
            if label == "Clavicle fracture":
                y0, x0, y1, x1 = clavicles[rng.integers(2)]
                t = rng.uniform(0.4, 0.8)
                sites = [(y0 + t * (y1 - y0), x0 + t * (x1 - x0))]
            else:
                cx = mid + rng.choice([-1, 1]) * rng.uniform(0.12, 0.3)
                k = rng.integers(2, 5)
                sites = [(ribs[j] + 0.09 * ((cx - 0.5 - dx) / 0.4) ** 2, cx) for j in range(k, k + 3)]
            for cy, cx in sites:  # a dark line 0.04 long, nearly across the bone
                t = np.clip(((Y - cy) * 0.02 + (X - cx) * 0.004) / (0.02 ** 2 + 0.004 ** 2), -1, 1)
                d = np.sqrt((Y - cy - t * 0.02) ** 2 + (X - cx - t * 0.004) ** 2) / U
                img -= 0.5 * a * _fine(d, SIGMA[label])
            ys, xs = [p[0] for p in sites], [p[1] for p in sites]
            box = (min(xs) - 7 * U, min(ys) - 0.02 - 4 * U, max(xs) + 7 * U, max(ys) + 0.02 + 4 * U)
        elif label == "Edema":
            for _, cx in lungs:
                img += 0.12 * a * _ellipse(Y, X, 0.45 + dy, 0.5 + dx + 0.55 * (cx - 0.5 - dx), 0.12, 0.09, soft=0.15)
            box = (0.5 + dx - 0.23, 0.3 + dy, 0.5 + dx + 0.23, 0.6 + dy)
        elif label == "Emphysema":
            box = (0.5 + dx - 0.34 * s, 0.14 + dy, 0.5 + dx + 0.34 * s, 0.8 + dy)
        elif label == "Enlarged PA":
            cy, cx, ry = 0.37 + dy, mid - 0.075, 0.035 * r
            rings = np.cos(2 * np.pi * np.sqrt((Y - cy) ** 2 + (X - cx) ** 2) / (PERIOD[label] * U))  # concentric
            img += 0.3 * a * _textured(_ellipse(Y, X, cy, cx, ry, ry), rings, SUBTLE_MEAN["Enlarged PA"])
            box = (cx - ry, cy - ry, cx + ry, cy + ry)
        elif label == "ILD":
            lung, cx = lungs[rng.integers(2)]
            zone = lung * (Y > 0.5 + dy) * (np.abs(X - cx) < 0.1)
            img += 0.15 * a * zone * np.sin(2 * np.pi * X / (PERIOD[label] * U)) * np.sin(2 * np.pi * Y / (PERIOD[label] * U))
            box = (cx - 0.1, 0.5 + dy, cx + 0.1, 0.78 + dy)
        elif label == "Infiltration":
            cy, cx, _ = lung_point()
            reticular = np.sin(2 * np.pi * (X + Y) / (PERIOD[label] * U)) * np.sin(2 * np.pi * (X - Y) / (PERIOD[label] * U))
            for _ in range(3):
                blob = _ellipse(Y, X, cy + rng.uniform(-0.04, 0.04), cx + rng.uniform(-0.04, 0.04), 0.025, 0.025, soft=0.2)
                img += 0.2 * a * _textured(blob, reticular, SUBTLE_MEAN["Infiltration"])
            box = (cx - 0.07, cy - 0.07, cx + 0.07, cy + 0.07)
        elif label == "Mediastinal shift":
            box = (mid - 0.07, 0.1, mid + 0.07, 0.66 + dy)
        elif label == "Pleural effusion":
            lung, cx = lungs[rng.integers(2)]
            level = rng.uniform(0.6, 0.66) + dy
            img += 0.32 * a * lung * (1 / (1 + np.exp(-(Y - level + 0.04 * np.abs(X - cx) / 0.15) / 0.008)))
            box = (cx - 0.16 * s, level - 0.04, cx + 0.16 * s, 0.8 + dy)
        elif label in ("Pleural thickening", "Pneumothorax"):
            _, cx = lungs[rng.integers(2)]
            side = np.sign(cx - 0.5 - dx)
            edge = cx + side * 0.13 * s
            y0 = rng.uniform(0.22, 0.4) + dy
            length, sigma = (0.12 if label == "Pleural thickening" else 0.25), SIGMA[label]
            t = np.clip((Y - y0) / length, 0, 1)  # a line along the lung edge, bowed out by up to 0.03
            d = np.where((Y >= y0) & (Y <= y0 + length), np.abs(X - edge - side * 0.03 * t * (1 - t) * 4) / U, np.inf)
            img += 0.5 * a * _fine(d, sigma, mean=SUBTLE_MEAN.get(label, 0.0))
            box = (edge - (side < 0) * 0.03 - 4 * U, y0 - 4 * U, edge + (side > 0) * 0.03 + 4 * U, y0 + length + 4 * U)
        elif label == "Pulmonary fibrosis":
            cy, cx, _ = lung_point()
            for _ in range(8):
                oy, ox, ang = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0, np.pi)
                y0, x0, y1, x1 = cy + oy, cx + ox, cy + oy + 0.03 * np.sin(ang), cx + ox + 0.03 * np.cos(ang)
                t = np.clip(((Y - y0) * (y1 - y0) + (X - x0) * (x1 - x0)) / 0.03 ** 2, 0, 1)
                d = np.sqrt((Y - y0 - t * (y1 - y0)) ** 2 + (X - x0 - t * (x1 - x0)) ** 2) / U
                img += 0.5 * a * _fine(d, SIGMA[label], mean=SUBTLE_MEAN["Pulmonary fibrosis"])
            box = (cx - 0.08, cy - 0.08, cx + 0.08, cy + 0.08)
        boxes.append((label, *np.clip(box, 0, 1)))
    img = np.clip(img + quantum_noise, 0, 1) ** exposure  # contrast varies between machines
    return img.astype(np.float32), boxes


def _write_dicom(path, image, rng, uid):
    """12-bit DICOM, as archives hold them: MONOCHROME1 or 2, some with rescale tags, some with a window."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    stored = np.round(image * 4095).astype(np.uint16)
    mono1 = rng.random() < 0.4
    if mono1:
        stored = 4095 - stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, uid, "DX"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    slope, intercept = (1.0, 0.0) if rng.random() < 0.7 else (rng.choice([0.5, 2.0]), -1024.0)
    if slope != 1.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if rng.random() < 0.5:
        low, high = stored.min() * slope + intercept, stored.max() * slope + intercept
        ds.WindowCenter, ds.WindowWidth = round((low + high) / 2, 1), round((high - low) * rng.uniform(0.9, 1.0), 1)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _synthetic_case(job):
    """Draws, writes and annotates one image; its own random stream makes the result independent of workers."""
    root, split, n, seed, prevalence = job
    rng = np.random.default_rng([seed, split == "test", n])
    image_id = hashlib.md5(f"{seed}-{split}-{n}".encode()).hexdigest()
    labels = []
    if rng.random() > 0.4:  # 60% abnormal, one or more findings each
        k = min(1 + rng.poisson(1.0), 4)
        labels = list(rng.choice(LOCAL_LABELS, size=k, replace=False, p=prevalence))
    h, w = int(rng.integers(200, 241)), int(rng.integers(192, 233))
    image, boxes = synthetic_chest(rng, h, w, labels)
    uid = pydicom.uid.generate_uid(entropy_srcs=[image_id])
    _write_dicom(os.path.join(root, split, f"{image_id}.dicom"), image, rng, uid)
    boxes = [(label, x0 * w, y0 * h, x1 * w, y1 * h) for label, x0, y0, x1, y1 in boxes]
    if split == "test":
        return image_id, [(None, boxes)]
    readers = []  # three readers who sometimes miss a finding (subtle and fine ones more often) or report a false one
    miss = {label: 0.1 if label in COARSE else 0.2 if label in SUBTLE else 0.3 for label in LOCAL_LABELS}
    for rad in rng.choice(17, size=3, replace=False) + 1:
        seen = [b for b in boxes if rng.random() > miss[b[0]]]
        seen = [(b[0], *(np.array(b[1:]) + rng.normal(0, 2, 4))) for b in seen]
        if rng.random() < 0.03:
            fx, fy = rng.uniform(0.2, 0.7) * w, rng.uniform(0.3, 0.6) * h
            seen.append((str(rng.choice(LOCAL_LABELS)), fx, fy, fx + 0.08 * w, fy + 0.08 * h))
        readers.append((f"R{rad}", seen))
    return image_id, readers


def make_synthetic(root, n_train=1000, n_test=300, seed=0, workers=None, verbose=True, create=True):
    """
    Writes a synthetic VinDr-CXR in the PhysioNet layout (DICOMs, image_labels_*.csv, annotations_*.csv), the
    same bytes for the same seed. Skips the work when root already holds a complete set with these settings;
    create=False only checks (NotReady while another process is still writing it).
    """
    settings = dict(n_train=n_train, n_test=n_test, seed=seed, version=VERSION)
    marker = os.path.join(root, "synthetic.json")

    def complete():
        if os.path.isfile(marker):
            with open(marker) as f:
                return json.load(f) == settings
        return False

    if complete():
        return root
    if not create:
        raise NotReady(root)
    with Lock(root.rstrip(os.sep) + ".lock", f"the synthetic set {root}"):  # two runs started at once: one writes it
        if not complete():
            _write(root, n_train, n_test, seed, workers, verbose)
            with open(marker, "w") as f:
                json.dump(settings, f)
    return root


def _write(root, n_train, n_test, seed, workers, verbose):
    for sub in ("train", "test", "annotations"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    weights = np.ones(len(LOCAL_LABELS))  # every finding equally likely: each label has positives to learn from
    jobs = [(root, split, n, seed, weights / weights.sum()) for split, count in (("train", n_train), ("test", n_test))
            for n in range(count)]
    start, results = time.time(), []
    with WorkerPool(workers or os.cpu_count(), describe=lambda job: f"drawing {job[1]} image {job[2]}") as pool:
        for count, result in enumerate(pool.imap(_synthetic_case, jobs, chunksize=8), 1):
            results.append(result)
            if verbose and (count % 100 == 0 or count == len(jobs)):
                print("\r" + progress_line("synthetic data", count, len(jobs), start), end="", flush=True)
    if verbose:
        print()
    for split, part in (("train", results[:n_train]), ("test", results[n_train:])):
        globals_ = GLOBAL_LABELS if split == "train" else GLOBAL_LABELS[:4] + ["Other disease", "No finding"]
        label_rows, box_rows = [], []
        for image_id, readers in part:
            for rad, seen in readers:
                found = {b[0] for b in seen}
                flags = [int(name in found) for name in LOCAL_LABELS] + [0, 0, 0, 0, int(bool(found)), int(not found)]
                label_rows.append([image_id] + ([rad] if rad else []) + flags)
                box_rows += [[image_id] + ([rad] if rad else []) + [b[0]] + [f"{v:.1f}" for v in b[1:]] for b in seen]
                if not found:
                    box_rows.append([image_id] + ([rad] if rad else []) + ["No finding", "", "", "", ""])
        id_cols = ["image_id", "rad_id"] if split == "train" else ["image_id"]
        for name, header, rows in ((f"image_labels_{split}.csv", id_cols + LOCAL_LABELS + globals_, label_rows),
                                   (f"annotations_{split}.csv", id_cols + ["class_name", "x_min", "y_min", "x_max", "y_max"], box_rows)):
            with open(os.path.join(root, "annotations", name), "w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows([header] + rows)
    with open(os.path.join(root, "label_groups.json"), "w") as f:  # evaluate.py reports a mean AUROC for each tier
        json.dump({name: [k for k in LOCAL_LABELS if k in tier] for name, tier in (("coarse", COARSE), ("subtle", SUBTLE),
                                                                                    ("fine", FINE))}, f, indent=1)


def tier(label):
    return "coarse" if label in COARSE else "subtle" if label in SUBTLE else "fine"


def survival(label, seeds=range(4), size=224):
    """{res: the share of what label changes in a size x size image that survives at res}, the mean over seeds:
    sum |LR(with) - LR(without)| / sum |with - without|, LR = mlcak.simulate_low_resolution, the same image drawn
    with and without the finding."""
    kept = {res: [] for res in RESOLUTIONS}
    for seed in seeds:
        plain, _ = synthetic_chest(np.random.default_rng(seed), size, size, [])
        drawn, _ = synthetic_chest(np.random.default_rng(seed), size, size, [label])
        for res in RESOLUTIONS:
            low = [simulate_low_resolution(torch.from_numpy(image)[None, None], res)[0, 0].numpy() for image in (drawn, plain)]
            kept[res].append(np.abs(low[0] - low[1]).sum() / np.abs(drawn - plain).sum())
    return {res: float(np.mean(k)) for res, k in kept.items()}


def in_tier(name, kept):
    """Whether survival() values lie in tier name's ranges (TIERS), falling with resolution where the tier says so."""
    inside = all(low <= kept[res] <= high for res, (low, high) in TIERS[name].items())
    return inside and (name == "coarse" or all(kept[a] > kept[b] for a, b in zip(RESOLUTIONS, RESOLUTIONS[1:])))


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m machinery.synthetic", description="Write the synthetic VinDr-CXR-style set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("root", nargs="?", default=os.path.join("data", "synthetic"), help="folder to write")
    p.add_argument("--n-train", type=int, default=1000, help="training images (three readers each)")
    p.add_argument("--n-test", type=int, default=300, help="test images; the training images do not depend on it")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole set")
    p.add_argument("--survival", action="store_true", help="print what each finding keeps at 112, 56 and 28 and its "
                   "tier's ranges, instead of writing a set")
    args = p.parse_args()
    if args.survival:
        print(f"{'finding':<20}{'tier':<8}" + "".join(f"{res:>7}" for res in RESOLUTIONS) + "   tier's ranges")
        for label in LOCAL_LABELS:
            kept, name = survival(label), tier(label)
            ranges = ", ".join(f"{res}: {low:g}..{min(high, 1):g}" for res, (low, high) in TIERS[name].items())
            print(f"{label:<20}{name:<8}" + "".join(f"{kept[res]:>7.2f}" for res in RESOLUTIONS)
                  + f"   {ranges}{'' if name == 'coarse' else ', falling'}{'' if in_tier(name, kept) else '  OUTSIDE'}")
    else:
        print(make_synthetic(args.root, args.n_train, args.n_test, args.seed))
