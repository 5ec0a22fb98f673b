"""
Chest X-ray pixels for MLCAK: the images that layouts.py lists, decoded once into a cache and served as a dataset.

    build_cache(source) -> folder       each image decoded once, on every core, into a uint8 memory map
    XrayDataset(folder)                 (image, local targets, abnormal, index) from that cache
    validation_rows(ds, fraction)       the validation images, never the test split's
    overlap_notes(sets)                 the same image or patient in two splits (a leak), or twice in one

DICOMs are windowed as a radiologist's screen shows them (read_dicom); PNG and JPEG are read as stored, 16-bit ones
spread over their own range (read_image).
Low-resolution images are not made here: mlcak.simulate_low_resolution makes them from HR batches.
"""

import hashlib
import json
import os
import time
from multiprocessing import Pool

import numpy as np
import pydicom
import torch
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from layouts import DataError, hash_fraction
from runtime import Lock, free_space, temporary_name

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CACHE_VERSION = 3  # 3: box origins and the files' ctime in the key
# transfer syntaxes that pydicom cannot decode on its own, and what to install for them
PLUGIN_HINTS = {
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",  # JPEG 2000
}


class NotReady(Exception):
    """Another process is still making the data or the cache that this one would read."""


# ---------------------------------------------------------------------------------------------- decoding

def read_dicom(path):
    """
    A radiograph as float32 in [0, 1], as it should look on screen (lungs dark, bone bright): stored values ->
    modality LUT (or rescale) -> VOI LUT, or window centre/width (linear, c +- w/2), or else the image's own
    min..max -> MONOCHROME1 inverted last, after the windowing that is defined on its stored polarity. A colour
    DICOM (RGB, or YBR that pydicom turns into RGB) is taken as displayed and made grey; a multi-frame one is refused.
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
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: a DICOM of {frames} frames; a radiograph has one")
    if ds.get("SamplesPerPixel", 1) == 3:  # a colour capture (a scanned film, a screenshot): display-ready, made grey
        grey = pixels.astype(np.float64) @ [0.299, 0.587, 0.114]  # (H, W, 3) -> (H, W), ITU-R BT.601 luma
        return np.clip(grey / (2 ** int(ds.get("BitsStored", 8)) - 1), 0, 1).astype(np.float32)
    image = apply_modality_lut(pixels, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        # a LUT is indexed by integers (pydicom warns on floats); its output spans 0 .. 2^bits - 1, as declared
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        image = apply_voi_lut(np.rint(image).astype(np.int64), ds, prefer_lut=True).astype(np.float64)
        low, high = 0, 2 ** bits - 1
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # either tag may hold several windows (a multi-value): the first is the default view
        centre, width = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
                         for v in (ds.WindowCenter, ds.WindowWidth))
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = image.min(), image.max()
    image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    if image.min() == image.max():
        why = ("its RescaleSlope is 0" if float(ds.get("RescaleSlope", 1) or 0) == 0 else
               "its stored values are all the same" if pixels.min() == pixels.max() else "its window lies outside its values")
        raise DataError(f"{path}: every pixel decodes to the same grey ({why}): not a radiograph to learn from")
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        image = 1 - image
    return image.astype(np.float32)


def read_image(path):
    """
    DICOM (by extension or content), or any image Pillow reads (PNG, JPEG, BMP, TIFF, WebP, GIF), as float32 in
    [0, 1], turned upright by its EXIF orientation as a viewer shows it. An 8-bit image is display-ready (/ 255); a
    16-bit one often holds 10 or 12-bit values, so like a DICOM without a window it is spread over its own range.
    An empty file, or an image whose pixels are all the same grey, is a DataError: it holds nothing to learn from.
    """
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: an empty file")
    if path.lower().endswith((".dcm", ".dicom")):
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # a phone or scanner JPEG may be stored on its side
            if im.mode.startswith(("I", "F")):
                image = np.asarray(im, np.float32)
                image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
            else:
                image = np.asarray(im.convert("L"), np.float32) / 255.0
    except Exception as err:
        if pydicom.misc.is_dicom(path):
            return read_dicom(path)
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    if image.min() == image.max():
        raise DataError(f"{path}: every pixel is the same grey: not a radiograph to learn from")
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


def progress_line(what, done, total, start):
    rate = done / max(time.time() - start, 1e-9)
    return f"{what}: {done}/{total} ({rate:.0f}/s, ETA {(total - done) / max(rate, 1e-9):.0f}s)"


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
