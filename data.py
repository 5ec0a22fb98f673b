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
