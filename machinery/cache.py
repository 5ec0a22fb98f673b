"""
Caches, both kept so that slow work is done once:

    build_cache(source, size) -> folder    every image of a dataset decoded once (all cores) into a uint8 memory map
                                           on disk, with its labels and boxes, found again by a key of its files
    StageCache(dataset, functions)         a training stage's per-image results in memory: the student's input and
                                           the frozen teacher's targets, computed once per image, looked up at each step

data.XrayDataset reads what build_cache wrote; train.train consults a StageCache.
"""

import hashlib
import json
import os
import re
import time

import numpy as np
import torch

from machinery.decode import read_image, resize_uint8
from machinery.layouts import DataError
from machinery.runtime import Lock, NotReady, WorkerPool, free_space, progress_line, temporary_name

PROJECT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # data/ of this project
CACHE_VERSION = 3  # 3: box origins and the files' ctime in the key
DecoderPool = WorkerPool  # the worker processes that decode (tests run them in-process)


# ---------------------------------------------------------------------------------------------- decoded images, on disk

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
        h.update(os.fsencode(p) + f"|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode())  # any name's bytes
    for array in (source.local, source.abnormal, source.boxes, source.frames, source.val):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def cache_folder(source, size=224, cache_root=None):
    key = cache_key(source, size)[:12]
    return os.path.join(cache_root or os.path.join(PROJECT_DATA, "cache"), f"{source.name}-{source.split}-{size}-{key}")


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


def build_cache(source, size=224, cache_root=None, workers=None, verbose=True, create=True, rebuild=False, progress=None):
    """
    Decodes every image of a layouts.Source once (all cores), squashed to size x size, into <folder>/images.npy (uint8,
    memory-mapped) with targets.npz (labels, boxes, frames, a digest of each image's pixels) and meta.json.
    Re-running after an interrupt continues where it stopped; unreadable files are skipped and listed in
    skipped.txt; a damaged cache is said and rebuilt; rebuild=True decodes every file again. One process builds
    a cache at a time (a lock beside it); create=False waits for another process's build (NotReady until it is
    complete). progress (default: verbose) prints the progress line alone. Returns the folder.
    """
    folder = cache_folder(source, size, cache_root)
    if not rebuild and os.path.isfile(os.path.join(folder, "meta.json")) and not damage(folder, len(source.paths), size):
        return folder
    if not create:
        raise NotReady(folder)
    try:
        with Lock(os.path.join(folder, ".lock"), f"the cache {folder}"):
            if not rebuild and os.path.isfile(os.path.join(folder, "meta.json")) and not damage(folder, len(source.paths), size):
                return folder  # built by the process that held the lock
            return _build(folder, source, size, workers, verbose, progress, rebuild)
    except OSError as err:  # a read-only folder, a full disk, a file size limit: said; the next run resumes what was written
        raise DataError(f"cache: cannot write in {folder} ({err.strerror or err}; {free_space(folder)} free); "
                        "give --cache-dir on a writable disk with space (or free some), then run again to resume") from None


def _build(folder, source, size, workers, verbose, progress, rebuild):
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
        with DecoderPool(workers or os.cpu_count(), describe=lambda job: f"reading {job[1]}", error=DataError) as pool:
            for count, (n, pixels, shape, error) in enumerate(pool.imap_unordered(_decode_one, todo, chunksize=8), 1):
                if error:
                    errors[n] = error
                else:
                    images[n], sizes[n], done[n] = pixels, shape, True
                if time.time() - last > 2 or count == len(todo):
                    save_progress()
                    last = time.time()
                    if verbose if progress is None else progress:
                        print("\r" + progress_line(f"cache {source.split}", count, len(todo), start), end="", flush=True)
    finally:
        save_progress()
        if (verbose if progress is None else progress) and todo:
            print()
    skipped = [errors[n] for n in sorted(errors)]
    with open(os.path.join(folder, "skipped.txt"), "w", errors="surrogateescape") as f:  # file names as they are
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



# ---------------------------------------------------------------------------------------------- a stage's results, in memory

class StageCache:
    """
    What a training step computes from its images and that never changes during a stage, computed once per image.
    train.py does not augment and its teacher is frozen in eval mode, so the student's input at --res and the
    teacher's targets depend on the training image alone. Where their results for every training image fit in
    memory (LIMIT), each function is run once over the training set, in its order, in batches of 128, and a step
    looks up its images' rows; otherwise each step runs the functions on its HR batch. Either way the steps see the
    same batches in the same order, with the same values up to the last bits of batched arithmetic.

        cache = StageCache(train_set, [student_input, teacher_targets], batch_size, seed, workers, ddp)
        for hr, labels, index in cache.batches(epoch):
            x = cache.get(student_input, hr, index)     # student_input(hr), looked up where it was computed

    hr is the HR batch, (B, 1, S, S) in [0, 1]; it is None where every function's results are in memory, as the
    step never needs it then (it is not loaded). A function returns a tensor, or a tuple of tensors and Nones.
    """

    LIMIT = 4 * 2 ** 30  # bytes of results kept in memory at most

    def __init__(self, dataset, functions, batch_size, seed, workers, ddp):
        self.dataset, self.device, self.workers = dataset, ddp.device, workers
        # the same sampler with one process or many: rank r takes every world-th image of one seeded permutation, so
        # N processes with batch B/N see, step by step, the same images as one process with batch B
        self.sampler = torch.utils.data.DistributedSampler(dataset, ddp.world, ddp.rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_sampler = torch.utils.data.BatchSampler(self.sampler, batch_size // ddp.world, drop_last=True)
        self.steps = len(self.batch_sampler)
        self.tables = {}  # function -> its results for every image of dataset, in dataset order
        if not functions or not len(dataset) or not self.steps:
            return
        loader = iter(torch.utils.data.DataLoader(dataset, batch_size=128, num_workers=workers))
        first = next(loader)[0].to(self.device)
        parts = {fn: [self._run(fn, first)] for fn in functions}
        size = sum(_nbytes(p[0]) for p in parts.values()) * len(dataset) / len(first)  # measured on the first batch
        if size > self.LIMIT:
            return
        try:  # (the first batch is one step's work: memory for it is memory the streamed steps need too)
            for images, *_ in loader:
                images = images.to(self.device, non_blocking=True)
                for fn in functions:
                    parts[fn].append(self._run(fn, images))
            for fn, results in parts.items():
                if isinstance(results[0], tuple):
                    self.tables[fn] = tuple(None if r[0] is None else torch.cat(r) for r in zip(*results))
                else:
                    self.tables[fn] = torch.cat(results)
        except (MemoryError, RuntimeError) as err:  # less memory than LIMIT assumed: the steps compute them instead
            if not isinstance(err, MemoryError) and not re.search(r"can't allocate memory|out of memory", str(err)):
                raise
            parts, self.tables = None, {}
            ddp.say(f"stage cache: memory ran out keeping {size / 1e9:.1f} GB of per-image results; each step computes "
                    "its own instead (slower; the same numbers up to the last bits)")
            return
        self.local = torch.from_numpy(dataset.local[dataset.indices].astype(np.float32)).to(self.device)
        self.abnormal = torch.from_numpy(dataset.abnormal[dataset.indices].astype(np.int64)).to(self.device)

    @staticmethod
    @torch.no_grad()
    def _run(fn, hr):
        return fn(hr)

    def get(self, fn, hr, index):
        """fn(hr) for the images at positions index of the dataset: looked up where it was computed once."""
        table = self.tables.get(fn)
        if table is None:
            return self._run(fn, hr)
        return tuple(None if t is None else t[index] for t in table) if isinstance(table, tuple) else table[index]

    def batches(self, epoch):
        """(HR batch or None, (local targets (B, L), abnormal (B,)), positions in the dataset (B,)) for each step."""
        self.sampler.set_epoch(epoch)
        if self.tables:
            for positions in self.batch_sampler:
                index = torch.tensor(positions, device=self.device)
                yield None, (self.local[index], self.abnormal[index]), index
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda")
        for positions, (images, local, abnormal, _) in zip(self.batch_sampler, loader):
            yield (images.to(self.device, non_blocking=True),
                   (local.to(self.device, non_blocking=True), abnormal.to(self.device, non_blocking=True)),
                   torch.tensor(positions, device=self.device))


def _nbytes(result):
    parts = result if isinstance(result, tuple) else (result,)
    return sum(p.numel() * p.element_size() for p in parts if p is not None)
