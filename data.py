"""
The data a run trains and tests on: a dataset as downloaded (machinery.layouts reads each layout), decoded once into
a cache (machinery.cache), served as PyTorch datasets and split into train, validation and test.

    load_splits(args) -> train, val, test, info    --data (or the synthetic default, made on first use), split, checked
    XrayDataset(folder)                            (image, local targets, abnormal, index) from a cache folder
    validation_rows, overlap_notes                 the validation images (never the test split's); leaks between splits
    test_dataset(ckpt)                             the test set a checkpoint names
    image_files(paths), image_dataset(files)       your own files and folders (evaluate.py --images), unlabelled

Low-resolution images are not made here: mlcak.simulate_low_resolution makes them from HR batches.
"""

import json
import os
import time

import numpy as np
import torch

from machinery import layouts, synthetic
from machinery.cache import CACHE_VERSION, PROJECT_DATA, build_cache, damage
from machinery.layouts import DataError, hash_fraction

DEFAULT_DATA = PROJECT_DATA  # data/ in this project: the synthetic set and the caches
NORM = (0.5, 0.25)  # the models' input normalization, (x - mean) / std, saved with every checkpoint

# ---------------------------------------------------------------------------------------------- the splits of a run

def load_splits(args, clock, create=True, verbose=True):
    """
    The train, validation and test sets of train.py's flags: --data (or the synthetic default, made on first use),
    read by its layout, each split decoded into a cache at --img-size, validation drawn from the training patients.
    Prints (with verbose) what it decided and found: the split sizes, labels without positives, leaks, bad boxes.
    create=False waits for another process to make the data and caches (NotReady). Returns (train, val, test, info).
    """
    start = time.time()
    path = args.data or synthetic.make_synthetic(os.path.join(DEFAULT_DATA, "synthetic"), verbose=verbose, create=create)
    clock.add("data", time.time() - start)
    sources = layouts.load_sources(path, args.readers, args.uncertain, args.views, args.boxes)
    start = time.time()
    caches = {split: build_cache(s, args.img_size, args.cache_dir, verbose=verbose, create=create,
                                 rebuild=args.rebuild_cache) for split, s in sources.items()}
    clock.add("cache", time.time() - start)
    train_all, test_set = XrayDataset(caches["train"]), XrayDataset(caches["test"])
    val_rows = validation_rows(train_all, args.val_fraction)
    train_set = XrayDataset(caches["train"], np.setdiff1d(train_all.indices, val_rows))
    val_set = XrayDataset(caches["train"], val_rows)
    notes = sources["train"].notes + sources["test"].notes
    notes += overlap_notes({"train": train_set, "val": val_set, "test": test_set})
    if not len(val_set):
        why = (f"{len(train_all)} training images are too few for --val-fraction {args.val_fraction}" if args.val_fraction
               else "--val-fraction 0")
        notes.append(f"no validation image ({why}): the model of the last epoch is kept (best = last)")
    elif not any(0 < c < len(val_set) for c in val_set.local[val_set.indices].sum(0)):
        notes.append(f"the {len(val_set)} validation images have no label with both classes: AUROC is undefined, best = last")
    for name, ds in (("train", train_set), ("test", test_set)):
        missing = [n for n, c in zip(ds.label_names, ds.local[ds.indices].sum(0)) if c == 0]
        if missing:
            consequence = "their AUROC is n/a" if name == "test" else "the model cannot learn them"
            notes.append(f"{name} has no positive case of {len(missing)} label(s): {', '.join(missing)}; {consequence}")
        abnormal = int(ds.abnormal[ds.indices].sum())
        if abnormal in (0, len(ds)):
            notes.append(f"{name}: all {len(ds)} images are {'abnormal' if abnormal else 'normal'}: normal/abnormal "
                         f"{'AUROC is n/a' if name == 'test' else 'cannot be learnt'}")
        if ds.bad_boxes:
            notes.append(f"{name}: {len(ds.bad_boxes)} boxes are empty or leave their image and are not used (the "
                         f"localization never counts them); first: {ds.bad_boxes[0]}")
    for note in notes + [f"{path}: {len(train_set)} train, {len(val_set)} val, {len(test_set)} test images, "
                         f"{len(train_set.label_names)} local labels"]:
        if verbose:
            print(f"data: {note}", flush=True)
    return train_set, val_set, test_set, dict(path=path, train_cache=caches["train"], test_cache=caches["test"])




def box_problem(box, frame):
    """Why a box (image, label, x_min, y_min, x_max, y_max in frame pixels) cannot mark a finding on its image of
    frame (rows, columns), or '' when it can. A corner may lie up to a pixel outside (rounding); then it is clipped."""
    _, _, x0, y0, x1, y1 = box
    h, w = frame
    if x1 <= x0 or y1 <= y0:
        return f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g} is empty or inverted"
    if x0 < -1 or y0 < -1 or x1 > w + 1 or y1 > h + 1:
        return f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g} leaves the image of {w:g} x {h:g} pixels"
    return ""


class XrayDataset(torch.utils.data.Dataset):
    """
    Items from a cache folder: (image (1, S, S) float32 in [0, 1], local targets (L,) float32, abnormal 0/1, index).
    indices picks a subset of the cache rows (for example a validation split); skipped files are never included.
    boxes(index) gives that image's finding boxes in cache pixels; a box that leaves its image or is empty is left
    out, and bad_boxes names each one (file, line, why).
    """

    def __init__(self, folder, indices=None):
        self.folder = folder
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        if self.meta.get("version") != CACHE_VERSION:
            raise DataError(f"{folder}: a cache of another version of data.py; delete it and run train.py to rebuild it")
        problem = damage(folder, len(self.meta["image_ids"]), self.meta["size"])
        if problem:
            raise DataError(f"{folder}: damaged cache ({problem}); delete the folder and run train.py to rebuild it")
        self.label_names, self.image_ids, self.groups = self.meta["label_names"], self.meta["image_ids"], self.meta["groups"]
        targets = np.load(os.path.join(folder, "targets.npz"))
        self.local, self.abnormal, self.frames = targets["local"], targets["abnormal"], targets["frames"]
        self.val, self.digests, usable = targets["val"], targets["digests"], targets["usable"]
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        self.indices = np.flatnonzero(usable) if indices is None else np.asarray([i for i in indices if usable[i]], np.int64)
        boxes, origins = targets["boxes"], targets["box_origins"]
        problems = [box_problem(b, self.frames[int(b[0])]) if usable[int(b[0])] else "" for b in boxes]
        self.bad_boxes = [f"{origin}: {why}" for origin, why in zip(origins, problems) if why]
        self._boxes = boxes[[not why for why in problems]].reshape(-1, 6)

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


def test_dataset(ckpt, data_path=None, cache_dir=None):
    """The test set a checkpoint names (its cache, else its data source), or the one at data_path."""
    if data_path is None and os.path.isfile(os.path.join(ckpt["data"]["test_cache"], "meta.json")):
        try:
            return XrayDataset(ckpt["data"]["test_cache"])
        except DataError:  # damaged or of another version: made again from the source below
            pass
    options = {k: ckpt["args"][k] for k in ("readers", "uncertain", "views", "boxes") if k in ckpt["args"]}
    source = layouts.load_source(data_path or ckpt["data"]["path"], "test", **options)
    return XrayDataset(build_cache(source, ckpt["vit_config"]["img_size"], cache_dir))


def label_groups(path):
    """{name: [label]} from label_groups.json beside a dataset (the synthetic set's coarse/subtle/fine), or {}."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(folder, "label_groups.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def image_dataset(files, label_names, size, cache_dir=None):
    """Your own files as an unlabelled dataset (its targets are zeros), decoded and cached as training images are;
    and the files that could not be read, each with its reason."""
    n = len(files)
    source = layouts.Source("images", "predict", list(files), [os.path.abspath(f) for f in files], list(label_names),
                            np.zeros((n, len(label_names)), np.uint8), np.zeros(n, np.uint8), np.zeros((0, 6), np.float32),
                            [], np.zeros((n, 2), np.float32), list(files), np.zeros(n, bool))
    folder = build_cache(source, size, cache_dir, verbose=False, progress=True)  # a progress line: new files take a while
    with open(os.path.join(folder, "skipped.txt"), errors="surrogateescape") as f:
        return XrayDataset(folder), f.read().splitlines()


def image_files(paths):
    """The files to predict, paths kept as given: each file named, and the images (layouts.is_image_file: by name, or
    by content where the name has no extension) in each folder named and below it, sorted; hidden names (.DS_Store,
    .ipynb_checkpoints/) left out. Returns (files, other files, links that lead to no file: broken, or a loop)."""
    files, others, broken = [], [], []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
            continue
        if not os.path.isdir(path):
            raise DataError(f"--images {path}: no such file or folder")
        for folder, subfolders, names in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                file = os.path.join(folder, name)
                if not os.path.isfile(file):  # a link to nothing: a broken link, or one in a loop
                    broken.append(file)
                else:
                    (files if layouts.is_image_file(file) else others).append(file)
    return files, others, broken
