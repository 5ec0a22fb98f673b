"""
The data a run trains and tests on: the images that layouts.py lists, decoded once into a cache (decode.py), served
as datasets, split, and turned into what each stage's steps read.

    load_splits(args) -> train, val, test    --data (or the synthetic default) by its layout, cached, split, checked
    build_cache(source) -> folder            each image decoded once, on every core, into a uint8 memory map
    XrayDataset(folder)                      (image, local targets, abnormal, index) from that cache
    StageData(dataset, res, teacher)         a stage's batches: the model input at res, the labels, the teacher's targets
    validation_rows, overlap_notes           the validation images (never the test split's); leaks between splits

Low-resolution images are not made here: mlcak.simulate_low_resolution makes them from HR batches.
"""

import hashlib
import json
import os
import time
from multiprocessing import Pool

import numpy as np
import torch

import layouts
import synthetic
from decode import read_image, resize_uint8
from layouts import DataError, hash_fraction
from mlcak import model_input, targets_from_teacher
from runtime import Lock, NotReady, free_space, progress_line, temporary_name
from vit import VARIANTS

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CACHE_VERSION = 3  # 3: box origins and the files' ctime in the key
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


# ---------------------------------------------------------------------------------------------- the cache

def _decode_one(job):
    n, path, size = job
    try:
        image = read_image(path)
        return n, resize_uint8(image, size), image.shape, None
    except Exception as err:  # one bad file must never stop a long build: it is reported by name instead
        return n, None, None, str(err) if isinstance(err, DataError) else f"{path}: {type(err).__name__}: {err}"


def cache_key(source, size):
    """
    Changes when the list of files, their labels and boxes, the size or the cache format change, or when any file's
    size, modification time or inode change time (ctime) does: a quick check, as rsync's, that never reads the
    files. Rewriting a file changes its ctime, which no tool sets back; --rebuild-cache decodes everything again.
    """
    h = hashlib.sha1(json.dumps([CACHE_VERSION, source.name, source.split, size, source.label_names,
                                 source.image_ids, source.groups]).encode())
    for p in source.paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode())
    for array in (source.local, source.abnormal, source.boxes, source.frames, source.val):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def cache_folder(source, size=224, cache_root=None):
    key = cache_key(source, size)[:12]
    return os.path.join(cache_root or os.path.join(DEFAULT_DATA, "cache"), f"{source.name}-{source.split}-{size}-{key}")


TARGETS = ("local", "abnormal", "boxes", "box_origins", "frames", "val", "usable", "digests")


def damage(folder, n, size):
    """Why the files in folder cannot be trusted (truncated, wrong shape, unreadable, pickled), or None when they can."""
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
    if os.path.isfile(os.path.join(folder, "meta.json")):
        try:  # every array read, as XrayDataset reads it: an object array (a pickle) is refused here
            with np.load(os.path.join(folder, "targets.npz")) as targets:
                lengths = {key: len(targets[key]) for key in TARGETS}
        except Exception as err:
            return f"targets.npz: {type(err).__name__}: {err}"
        if any(lengths[key] != n for key in ("local", "abnormal", "frames", "val", "usable", "digests")):
            return f"targets.npz holds arrays of {sorted(set(lengths.values()))} rows, expected {n}"
    return None


def build_cache(source, size=224, cache_root=None, workers=None, verbose=True, create=True, rebuild=False):
    """
    Decodes every image of a layouts.Source once (all cores), squashed to size x size, into <folder>/images.npy (uint8,
    memory-mapped) with targets.npz (labels, boxes, frames, a digest of each image's pixels) and meta.json.
    Re-running after an interrupt continues where it stopped; unreadable files are skipped and listed in
    skipped.txt; a damaged cache is said and rebuilt; rebuild=True decodes every file again. One process builds
    a cache at a time (a lock beside it); create=False waits for another process's build (NotReady until it is
    complete). Returns the folder.
    """
    folder = cache_folder(source, size, cache_root)
    if not rebuild and os.path.isfile(os.path.join(folder, "meta.json")) and not damage(folder, len(source.paths), size):
        return folder
    if not create:
        raise NotReady(folder)
    with Lock(os.path.join(folder, ".lock"), f"the cache {folder}"):
        try:
            if not rebuild and os.path.isfile(os.path.join(folder, "meta.json")) and not damage(folder, len(source.paths), size):
                return folder  # built by the process that held the lock
            return _build(folder, source, size, workers, verbose, rebuild)
        except OSError as err:  # a full disk, a file size limit: said, and the next run resumes what was written
            raise DataError(f"cache: cannot write in {folder} ({err.strerror or err}; {free_space(folder)} free); "
                            "free some space or give --cache-dir on another disk, then run again to resume") from None


def _build(folder, source, size, workers, verbose, rebuild):
    N = len(source.paths)
    complete = os.path.isfile(os.path.join(folder, "meta.json"))
    problem = damage(folder, N, size) if complete or os.path.isfile(os.path.join(folder, "done.npy")) else None
    if problem:
        print(f"cache: {folder} is damaged ({problem}); rebuilding it", flush=True)
    if problem or rebuild:
        for name in ("meta.json", "done.npy"):
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    os.makedirs(folder, exist_ok=True)
    image_file, done_file, sizes_file = (os.path.join(folder, f) for f in ("images.npy", "done.npy", "sizes.npy"))
    fresh = not os.path.isfile(done_file)
    images = np.lib.format.open_memmap(image_file, mode="w+" if fresh else "r+", dtype=np.uint8, shape=(N, size, size))
    sizes = np.lib.format.open_memmap(sizes_file, mode="w+" if fresh else "r+", dtype=np.int32, shape=(N, 2))
    if fresh:  # the disk space taken now, not at each page's first write: a full disk is an error here, not a SIGBUS later
        for path in (image_file, sizes_file):
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    done = np.zeros(N, bool) if fresh else np.load(done_file)
    todo = [(n, source.paths[n], size) for n in np.flatnonzero(~done)]
    errors, start, last = {}, time.time(), 0.0

    def save_progress():  # pixels reach the disk before the flags that say they are there
        images.flush()
        sizes.flush()
        tmp = temporary_name(done_file) + ".npy"
        np.save(tmp, done)
        os.replace(tmp, done_file)

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
             box_origins=np.array(source.box_origins, str), frames=frames, val=source.val, usable=done, digests=digests)
    meta = dict(version=CACHE_VERSION, source=source.name, split=source.split, size=size, label_names=source.label_names,
                image_ids=source.image_ids, groups=source.groups, skipped=len(skipped))
    tmp = temporary_name(os.path.join(folder, "meta.json"))
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(folder, "meta.json"))  # marks the cache complete
    return folder


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


# ---------------------------------------------------------------------------------------------- a stage's batches

class StageData:
    """
    What the steps of one stage read: the model's input at the stage's resolution, the labels and, for mlcak, the
    teacher's targets (mlcak.targets_from_teacher: its probabilities and its MLCAK map, the frozen teacher run on the
    HR image). Nothing here changes between epochs (train.py does not augment, and the teacher is frozen in eval
    mode), so where it fits in memory it is computed once for every training image: the steps then spend no time on
    the low-resolution simulation, the teacher's forward pass or the loader. Otherwise each batch is loaded and
    computed at its step, as the paper's loss reads. Both give the same batches in the same order.
    """

    LIMIT = 4 * 2 ** 30  # bytes kept in memory at most

    def __init__(self, dataset, res, teacher, need_attn, autocast, args, ddp):
        self.dataset, self.res, self.teacher, self.need_attn, self.autocast = dataset, res, teacher, need_attn, autocast
        self.args, self.device = args, ddp.device
        # the same sampler with one process or many: rank r takes every world-th image of one seeded permutation, so
        # N processes with batch B/N see, step by step, the same images as one process with batch B
        self.sampler = torch.utils.data.DistributedSampler(dataset, ddp.world, ddp.rank, shuffle=True, seed=args.seed, drop_last=True)
        self.batch_sampler = torch.utils.data.BatchSampler(self.sampler, args.batch_size // ddp.world, drop_last=True)
        self.steps = len(self.batch_sampler)
        S, L = args.img_size, len(dataset.label_names)
        T = (args.img_size // VARIANTS[args.model].get("patch_size", 16)) ** 2 + 1  # tokens, the class token included
        per_image = S * S + L + 1  # float32 values: the model input, the local targets, abnormal
        if teacher is not None:
            per_image += L + 2 + (T * T if need_attn else 0)  # the teacher's probabilities and its MLCAK map
        size = 4 * len(dataset) * per_image
        self.table = None
        if size <= self.LIMIT:
            loader = torch.utils.data.DataLoader(dataset, batch_size=128, num_workers=args.workers)
            parts = [self.compute(images, local, abnormal) for images, local, abnormal, _ in loader]
            self.table = [None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(6)]

    @torch.no_grad()
    def compute(self, images, local, abnormal):
        """(model input, local, abnormal, p_local^T, p_global^T, MLCAK^T) of a batch; the teacher's None for others."""
        images = images.to(self.device, non_blocking=True)
        x = model_input(images, self.res, NORM)
        teacher_targets = (None, None, None)
        if self.teacher is not None:
            with self.autocast():
                hr = model_input(images, self.args.img_size, NORM)
                teacher_targets = targets_from_teacher(self.teacher(hr, return_attn=self.need_attn))
        return (x, local.to(self.device, non_blocking=True), abnormal.to(self.device, non_blocking=True), *teacher_targets)

    def batches(self, epoch):
        """(model input, (local targets, abnormal), the teacher's targets or None) for each step of an epoch."""
        self.sampler.set_epoch(epoch)
        if self.table is not None:
            for positions in self.batch_sampler:
                index = torch.tensor(positions, device=self.device)
                x, local, abnormal, *teacher_targets = (None if part is None else part[index] for part in self.table)
                yield x, (local, abnormal), (tuple(teacher_targets) if self.teacher is not None else None)
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=self.args.workers,
                                             pin_memory=self.device.type == "cuda")
        for images, local, abnormal, _ in loader:
            x, local, abnormal, *teacher_targets = self.compute(images, local, abnormal)
            yield x, (local, abnormal), (tuple(teacher_targets) if self.teacher is not None else None)
