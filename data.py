"""
Chest X-ray data for MLCAK: VinDr-CXR (the paper's dataset), its Kaggle copy, any dataset described by a CSV,
a preprocessing cache, and a synthetic default in VinDr-CXR's own layout.

    load_source(path, split)  ->  Source        reads labels and boxes (layouts below), checks that files exist
    build_cache(source, size) ->  folder        decodes each image once, on every core, into a uint8 memmap
    XrayDataset(folder)                         (image, local targets, global target, index) from that cache
    make_synthetic(root)                        writes the synthetic default (DICOMs and CSVs, VinDr layout)

Layouts, told apart by what the folder holds:
    VinDr-CXR (PhysioNet)  train/ test/ <image_id>.dicom, annotations/image_labels_{train,test}.csv,
                           annotations/annotations_{train,test}.csv
    VinBigData (Kaggle)    train.csv, train/<image_id>.dicom; test = 20% of train by a hash of image_id
    CSV                    a .csv file: path column, one 0/1 column per label, optional 'No finding' and 'split'

Low-resolution images are not made here: mlcak.simulate_low_resolution makes them from the HR batch.
"""

import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import Pool

import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

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
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CACHE_VERSION = 1
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


def hash_fraction(key):
    """A number in [0, 1) fixed by the string alone (same on every machine), for deterministic splits."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2 ** 32


# ---------------------------------------------------------------------------------------------- label sources

@dataclass
class Source:
    name: str                  # 'vindr', 'kaggle' or 'csv'
    split: str                 # 'train' or 'test'
    image_ids: list
    paths: list
    label_names: list
    local: np.ndarray          # (N, L) uint8, MLCT targets
    abnormal: np.ndarray       # (N,) uint8, MCCT target: 0 normal, 1 abnormal
    boxes: np.ndarray          # (M, 6) float32: image index, label index, x_min, y_min, x_max, y_max (original px)
    notes: list = field(default_factory=list)  # what the reader should be told (counts of choices made)


def read_csv(path, required):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        columns = rows[0].keys() if rows else []
    for column in required:
        if column not in columns:
            raise DataError(f"{path}: missing column '{column}'")
    return rows


def to_int(value, path, column):
    try:
        return int(float(value))
    except ValueError:
        raise DataError(f"{path}: column '{column}' holds '{value}', expected 0 or 1") from None


def aggregate_readers(votes, n_readers, readers):
    """votes (N, L) positive-reader counts -> (N, L) uint8: 'majority' is more than half the readers, 'any' one."""
    if readers == "majority":
        return (2 * votes > n_readers[:, None]).astype(np.uint8)
    if readers == "any":
        return (votes > 0).astype(np.uint8)
    raise DataError(f"--readers must be 'majority' or 'any', not '{readers}'")


def read_boxes(path, ids, labels, notes):
    """Boxes of the known local labels, for the images in ids; classes outside the label set are counted in notes."""
    index, label_index = {i: n for n, i in enumerate(ids)}, {name: k for k, name in enumerate(labels)}
    rows = [r for r in read_csv(path, ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"]) if r["image_id"] in index]
    other = sorted({r["class_name"] for r in rows} - set(label_index) - {"No finding"})
    if other:
        notes.append(f"{path}: boxes of {len(other)} class(es) outside the label set not used: {', '.join(other)}")
    boxes = [(index[r["image_id"]], label_index[r["class_name"]], *(float(r[c]) for c in ("x_min", "y_min", "x_max", "y_max")))
             for r in rows if r["class_name"] in label_index and r["x_min"] != ""]
    return np.array(boxes, np.float32).reshape(-1, 6)


def check_files(paths, ids, folder, listing):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{missing[0]}: listed in {listing} but no such file ({len(missing)} missing in all)")
    on_disk = {os.path.splitext(f)[0] for f in os.listdir(folder)} if os.path.isdir(folder) else set()
    unlabelled = sorted(on_disk - set(ids))
    return [f"{len(unlabelled)} files in {folder} have no labels and are not used, e.g. {unlabelled[0]}"] if unlabelled else []


def load_vindr(root, split, readers):
    path = os.path.join(root, "annotations", f"image_labels_{split}.csv")
    rows = read_csv(path, ["image_id"] + LOCAL_LABELS + ["No finding"])
    ids = sorted({r["image_id"] for r in rows})
    index = {i: n for n, i in enumerate(ids)}
    votes, no_finding = np.zeros((len(ids), len(LOCAL_LABELS))), np.zeros(len(ids))
    n_readers = np.zeros(len(ids))
    for r in rows:  # the train file has one row per reader, the test file one consensus row per image
        n = index[r["image_id"]]
        votes[n] += [to_int(r[c], path, c) for c in LOCAL_LABELS]
        no_finding[n] += to_int(r["No finding"], path, "No finding")
        n_readers[n] += 1
    local = aggregate_readers(votes, n_readers, readers)
    abnormal = local.any(axis=1).astype(np.uint8)  # normal = no local label positive after aggregation
    said_normal = aggregate_readers(no_finding[:, None], n_readers, readers)[:, 0]
    disagree = int(((abnormal == 0) != (said_normal == 1)).sum())
    notes = [f"{split}: {disagree} of {len(ids)} images have a 'No finding' vote that disagrees with their local "
             "labels; the local labels decide (normal = no local label positive)"]
    paths = [os.path.join(root, split, f"{i}.dicom") for i in ids]
    notes += check_files(paths, ids, os.path.join(root, split), path)
    boxes = read_boxes(os.path.join(root, "annotations", f"annotations_{split}.csv"), ids, LOCAL_LABELS, notes)
    return Source("vindr", split, ids, paths, list(LOCAL_LABELS), local, abnormal, boxes, notes)


def load_kaggle(root, split, readers, test_fraction=0.2):
    path = os.path.join(root, "train.csv")
    rows = read_csv(path, ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"])
    in_split = lambda i: (hash_fraction(i) < test_fraction) == (split == "test")
    ids = sorted({r["image_id"] for r in rows if in_split(r["image_id"])})
    index, label_index = {i: n for n, i in enumerate(ids)}, {c: k for k, c in enumerate(KAGGLE_LABELS)}
    reader_sets, positive = [set() for _ in ids], {}
    for r in rows:
        if r["image_id"] in index:
            n = index[r["image_id"]]
            reader_sets[n].add(r["rad_id"])
            if r["class_name"] in label_index:  # a reader with several boxes of one class votes once
                positive.setdefault((n, label_index[r["class_name"]]), set()).add(r["rad_id"])
    votes = np.zeros((len(ids), len(KAGGLE_LABELS)))
    for (n, k), who in positive.items():
        votes[n, k] = len(who)
    local = aggregate_readers(votes, np.array([len(s) for s in reader_sets], float), readers)
    paths = [os.path.join(root, "train", f"{i}.dicom") for i in ids]
    check_files(paths, ids, os.path.join(root, "train"), path)  # the other split's files are on disk too
    notes = [f"{split}: {len(ids)} images, the {split} part of a split by sha1(image_id) ({test_fraction:.0%} test)"]
    boxes = read_boxes(path, ids, KAGGLE_LABELS, notes)
    return Source("kaggle", split, ids, paths, list(KAGGLE_LABELS), local, local.any(1).astype(np.uint8), boxes, notes)


def load_csv_dataset(path, split, test_fraction=0.2):
    rows = read_csv(path, ["path"])
    labels = [c for c in rows[0] if c not in ("path", "split", "No finding", "image_id")]
    if not labels:
        raise DataError(f"{path}: no label columns (every column but path, split, image_id and 'No finding' is a label)")
    if "split" in rows[0]:
        bad = {r["split"] for r in rows} - {"train", "test"}
        if bad:
            raise DataError(f"{path}: column 'split' holds {sorted(bad)}, expected 'train' or 'test'")
        rows = [r for r in rows if r["split"] == split]
    else:
        rows = [r for r in rows if (hash_fraction(r["path"]) < test_fraction) == (split == "test")]
    local = np.array([[to_int(r[c], path, c) for c in labels] for r in rows], np.uint8).reshape(-1, len(labels))
    if "No finding" in (rows[0] if rows else {}):
        abnormal = np.array([1 - to_int(r["No finding"], path, "No finding") for r in rows], np.uint8)
    else:
        abnormal = local.any(axis=1).astype(np.uint8)
    base = os.path.dirname(os.path.abspath(path))
    paths = [os.path.join(base, r["path"]) for r in rows]
    ids = [r.get("image_id") or r["path"] for r in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{missing[0]}: listed in {path} but no such file ({len(missing)} missing in all)")
    return Source("csv", split, ids, paths, labels, local, abnormal, np.zeros((0, 6), np.float32))


def load_source(path, split, readers="majority"):
    """Reads the labels of one split from a VinDr-CXR folder, a Kaggle VinBigData folder or a CSV file."""
    if path.endswith(".csv"):
        source = load_csv_dataset(path, split)
    elif os.path.isfile(os.path.join(path, "annotations", "image_labels_train.csv")):
        source = load_vindr(path, split, readers)
    elif os.path.isfile(os.path.join(path, "train.csv")):
        source = load_kaggle(path, split, readers)
    elif not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    else:
        raise DataError(f"{path}: neither a VinDr-CXR folder (annotations/image_labels_train.csv), "
                        "a Kaggle folder (train.csv) nor a .csv file")
    if not source.image_ids:
        raise DataError(f"{path}: the {split} split is empty")
    return source


# ---------------------------------------------------------------------------------------------- decoding

def read_dicom(path):
    """
    A radiograph as float32 in [0, 1], as it should look on screen (lungs dark, bone bright): stored values ->
    modality LUT (or rescale) -> VOI LUT, or window centre/width (linear, c +- w/2), or else the image's own
    min..max -> MONOCHROME1 inverted last, after the windowing that is defined on its stored polarity.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
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
    """DICOM (by content or extension) or PNG/JPEG of 8 or 16 bits, as float32 in [0, 1]."""
    if path.lower().endswith((".dcm", ".dicom")):
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I"):
                image = np.asarray(im, np.float32) / (65535.0 if im.mode.startswith("I;16") else max(np.asarray(im).max(), 1))
            else:
                image = np.asarray(im.convert("L"), np.float32) / 255.0
    except Exception as err:
        if pydicom.misc.is_dicom(path):
            return read_dicom(path)
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return image


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
                                 source.image_ids]).encode())
    for p in source.paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    for array in (source.local, source.abnormal, source.boxes):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def progress_line(what, done, total, start, extra=""):
    rate = done / max(time.time() - start, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    return f"{what}: {done}/{total} ({rate:.0f}/s, ETA {eta:.0f}s){extra}"


def build_cache(source, size=224, cache_root=None, workers=None, verbose=True):
    """
    Decodes every image of a Source once (all cores), squashed to size x size, into <folder>/images.npy (uint8,
    memory-mapped) with targets.npz (labels, boxes, original sizes) and meta.json. Re-running after an interrupt
    continues where it stopped; unreadable files are skipped and listed in skipped.txt. Returns the folder.
    """
    key = cache_key(source, size)
    folder = os.path.join(cache_root or os.path.join(DEFAULT_DATA, "cache"), f"{source.name}-{source.split}-{size}-{key[:12]}")
    if os.path.isfile(os.path.join(folder, "meta.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    N = len(source.paths)
    image_file, done_file, sizes_file = (os.path.join(folder, f) for f in ("images.npy", "done.npy", "sizes.npy"))
    fresh = not os.path.isfile(done_file)
    images = np.lib.format.open_memmap(image_file, mode="w+" if fresh else "r+", dtype=np.uint8, shape=(N, size, size))
    sizes = np.lib.format.open_memmap(sizes_file, mode="w+" if fresh else "r+", dtype=np.int32, shape=(N, 2))
    done = np.zeros(N, bool) if fresh else np.load(done_file)
    todo = [(n, source.paths[n], size) for n in np.flatnonzero(~done)]
    errors, start, last = {}, time.time(), 0.0

    def save_progress():  # pixels reach the disk before the flags that say they are there
        images.flush(), sizes.flush()
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
    np.savez(os.path.join(folder, "targets.npz"), local=source.local, abnormal=source.abnormal, boxes=source.boxes,
             usable=done)
    meta = dict(version=CACHE_VERSION, key=key, source=source.name, split=source.split, size=size,
                label_names=source.label_names, image_ids=source.image_ids, skipped=len(skipped))
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
        self.label_names, self.image_ids = self.meta["label_names"], self.meta["image_ids"]
        targets = np.load(os.path.join(folder, "targets.npz"))
        self.local, self.abnormal, self._boxes = targets["local"], targets["abnormal"], targets["boxes"]
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        self.sizes = np.load(os.path.join(folder, "sizes.npy"))
        usable = targets["usable"]
        self.indices = np.flatnonzero(usable) if indices is None else np.asarray([i for i in indices if usable[i]])

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        n = int(self.indices[i])
        return self.image(n), torch.from_numpy(self.local[n].astype(np.float32)), int(self.abnormal[n]), n

    def image(self, n):
        """Cache row n as a (1, S, S) float32 tensor in [0, 1]."""
        return torch.from_numpy(self.images[n].astype(np.float32) / 255.0)[None]  # (S, S) -> (1, S, S)

    def boxes(self, n):
        """(K, 5) float32: label index, x_min, y_min, x_max, y_max, scaled from original to cache pixels."""
        rows = self._boxes[self._boxes[:, 0] == n][:, 1:].copy()
        S, (h, w) = self.meta["size"], self.sizes[n]
        rows[:, [1, 3]] *= S / w
        rows[:, [2, 4]] *= S / h
        return rows


# ---------------------------------------------------------------------------------------------- synthetic default

# 'coarse' findings stay visible at 28 x 28; 'fine' ones (a few pixels wide, with zero local mean) only at high
# resolution, so that a low-resolution baseline falls below the teacher and distillation has something to pass on.
COARSE = {"Aortic enlargement", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Emphysema",
          "Enlarged PA", "Infiltration", "Lung Opacity", "Mediastinal shift", "Pleural effusion"}
U = 1 / 224  # one pixel at the teacher's resolution, in image fractions: fine findings are a few U wide


def _ellipse(Y, X, cy, cx, ry, rx, soft=0.08):
    d = np.sqrt(((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2)
    return 1 / (1 + np.exp(np.clip((d - 1) / soft, -50, 50)))


def _segment(Y, X, y0, x0, y1, x1, width):
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((Y - y0) * dy + (X - x0) * dx) / (dy * dy + dx * dx), 0, 1)
    return np.exp(-(((Y - y0 - t * dy) ** 2 + (X - x0 - t * dx) ** 2) / width ** 2))


def _fine(d, sigma, dims=1):
    """A structure of width sigma pixels at distance d (pixels) with zero local mean (a difference of Gaussians),
    as unsharp masking leaves small structures on a processed radiograph: averaging over 8 x 8 pixels erases it."""
    return np.exp(-d ** 2 / (2 * sigma ** 2)) - 0.5 ** dims * np.exp(-d ** 2 / (8 * sigma ** 2))


def synthetic_chest(rng, h, w, labels):
    """One chest radiograph-like image (float in [0, 1], bright = dense) with the given findings drawn in,
    and their boxes as (label, x_min, y_min, x_max, y_max) in image fractions."""
    Y, X = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
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
            img += 0.22 * a * _ellipse(Y, X, cy, cx, ry, ry); box = (cx - ry, cy - ry, cx + ry, cy + ry)
        elif label in ("Atelectasis", "Consolidation", "Lung Opacity"):
            ry, rx, amp = {"Atelectasis": (0.022, 0.07, 0.22), "Consolidation": (0.08, 0.07, 0.25),
                           "Lung Opacity": (0.05, 0.05, 0.18)}[label]
            cy, cx, _ = lung_point()
            img += amp * a * _ellipse(Y, X, cy, cx, ry * r, rx * r, soft=0.15); box = (cx - rx * r, cy - ry * r, cx + rx * r, cy + ry * r)
        elif label in ("Nodule/Mass", "Calcification", "Other lesion", "Lung cavity", "Lung cyst"):
            count, spread, sigma, amp, ring = {  # ring: radius in pixels of a ring-shaped wall, 0 for a dot
                "Nodule/Mass": (5, 0.05, 1.6, 0.5, 0), "Calcification": (10, 0.04, 0.8, 0.9, 0),
                "Other lesion": (6, 0.03, 1.2, 0.6, 0), "Lung cavity": (2, 0.04, 1.0, 0.6, 5),
                "Lung cyst": (3, 0.05, 0.7, 0.6, 3.5)}[label]
            cy, cx, _ = lung_point()
            pts = [(cy + rng.uniform(-spread, spread), cx + rng.uniform(-spread, spread)) for _ in range(count)]
            for py, px in pts:
                d = np.sqrt((Y - py) ** 2 + (X - px) ** 2) / U
                img += amp * a * (_fine(d - ring, sigma) if ring else _fine(d, sigma, dims=2))
            ys, xs = [p[0] for p in pts], [p[1] for p in pts]
            m = (ring + 4 * sigma + 1) * U
            box = (min(xs) - m, min(ys) - m, max(xs) + m, max(ys) + m)
        elif label == "Cardiomegaly":
            cy, cx, ry, rx = 0.61 + dy, mid + 0.05, 0.13 * s * heart, 0.15 * s * heart
            box = (cx - rx, cy - ry, cx + rx, cy + ry)
        elif label in ("Clavicle fracture", "Rib fracture"):
            if label == "Clavicle fracture":
                y0, x0, y1, x1 = clavicles[rng.integers(2)]
                t = rng.uniform(0.4, 0.8); sites = [(y0 + t * (y1 - y0), x0 + t * (x1 - x0))]
            else:
                cx = mid + rng.choice([-1, 1]) * rng.uniform(0.12, 0.3)
                k = rng.integers(2, 5)
                sites = [(ribs[j] + 0.09 * ((cx - 0.5 - dx) / 0.4) ** 2, cx) for j in range(k, k + 3)]
            for cy, cx in sites:  # a dark line 0.04 long, nearly across the bone
                t = np.clip(((Y - cy) * 0.02 + (X - cx) * 0.004) / (0.02 ** 2 + 0.004 ** 2), -1, 1)
                d = np.sqrt((Y - cy - t * 0.02) ** 2 + (X - cx - t * 0.004) ** 2) / U
                img -= 0.5 * a * _fine(d, 0.8)
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
            img += 0.2 * a * _ellipse(Y, X, cy, cx, ry, ry); box = (cx - ry, cy - ry, cx + ry, cy + ry)
        elif label == "ILD":
            lung, cx = lungs[rng.integers(2)]
            zone = lung * (Y > 0.5 + dy) * (np.abs(X - cx) < 0.1)
            img += 0.15 * a * zone * np.sin(2 * np.pi * X / (4 * U)) * np.sin(2 * np.pi * Y / (4 * U))
            box = (cx - 0.1, 0.5 + dy, cx + 0.1, 0.78 + dy)
        elif label == "Infiltration":
            cy, cx, _ = lung_point()
            for _ in range(3):
                img += 0.14 * a * _ellipse(Y, X, cy + rng.uniform(-0.04, 0.04), cx + rng.uniform(-0.04, 0.04), 0.025, 0.025, soft=0.2)
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
            length, sigma = (0.12, 1.4) if label == "Pleural thickening" else (0.25, 0.8)
            t = np.clip((Y - y0) / length, 0, 1)  # a line along the lung edge, bowed out by up to 0.03
            d = np.where((Y >= y0) & (Y <= y0 + length), np.abs(X - edge - side * 0.03 * t * (1 - t) * 4) / U, np.inf)
            img += 0.5 * a * _fine(d, sigma)
            box = (edge - (side < 0) * 0.03 - 4 * U, y0 - 4 * U, edge + (side > 0) * 0.03 + 4 * U, y0 + length + 4 * U)
        elif label == "Pulmonary fibrosis":
            cy, cx, _ = lung_point()
            for _ in range(8):
                oy, ox, ang = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0, np.pi)
                y0, x0, y1, x1 = cy + oy, cx + ox, cy + oy + 0.03 * np.sin(ang), cx + ox + 0.03 * np.cos(ang)
                t = np.clip(((Y - y0) * (y1 - y0) + (X - x0) * (x1 - x0)) / 0.03 ** 2, 0, 1)
                img += 0.5 * a * _fine(np.sqrt((Y - y0 - t * (y1 - y0)) ** 2 + (X - x0 - t * (x1 - x0)) ** 2) / U, 0.7)
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
    readers = []  # three readers who sometimes miss a finding (fine ones more often) or report a false one
    for rad in rng.choice(17, size=3, replace=False) + 1:
        seen = [b for b in boxes if rng.random() > (0.1 if b[0] in COARSE else 0.3)]
        seen = [(b[0], *(np.array(b[1:]) + rng.normal(0, 2, 4))) for b in seen]
        if rng.random() < 0.03:
            fx, fy = rng.uniform(0.2, 0.7) * w, rng.uniform(0.3, 0.6) * h
            seen.append((str(rng.choice(LOCAL_LABELS)), fx, fy, fx + 0.08 * w, fy + 0.08 * h))
        readers.append((f"R{rad}", seen))
    return image_id, readers


def make_synthetic(root, n_train=1000, n_test=300, seed=0, workers=None, verbose=True):
    """
    Writes a synthetic VinDr-CXR in the PhysioNet layout (DICOMs, image_labels_*.csv, annotations_*.csv), the
    same bytes for the same seed. Skips the work when root already holds a complete set with these settings.
    """
    settings = dict(n_train=n_train, n_test=n_test, seed=seed, version=CACHE_VERSION)
    marker = os.path.join(root, "synthetic.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == settings:
                return root
    for sub in ("train", "test", "annotations"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    weights = np.ones(len(LOCAL_LABELS))  # every finding equally likely: each label has positives to learn from
    jobs = [(root, split, n, seed, weights / weights.sum()) for split, count in (("train", n_train), ("test", n_test))
            for n in range(count)]
    start, results = time.time(), []
    with Pool(workers or os.cpu_count()) as pool:
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
    with open(marker, "w") as f:
        json.dump(settings, f)
    return root
