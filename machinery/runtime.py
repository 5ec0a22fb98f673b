"""
The machinery train.py and evaluate.py share, none of it the method, kept out of the reader's way:

    save_checkpoint / read_checkpoint / load_checkpoint    plain dicts of tensors and values (weights_only loading)
    Parser, run_cli, add_shared_flags                      a bad flag or a failed run is one line, never a traceback
    pick_device                                            the device a command runs on
    writable, free_space, Lock, NotReady, progress_line    folders, disks, a second process, long work
    WorkerPool                                             work on every core that ends, with a line, if a worker dies

Everything in machinery/ may import it; it imports vit.py, to rebuild a model from its checkpoint, and nothing
else of ours.
"""

import argparse
import contextlib
import dataclasses
import fcntl
import multiprocessing
import os
import pickletools
import re
import shutil
import signal
import sys
import time
import uuid
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import torch

from vit import VisionTransformer, ViTConfig


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this model, or one that cannot be written; one line naming the file."""


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss, a teacher that does not fit); the message is one line."""


# -------------------------------------------------------------------------------------------------- checkpoints

def temporary_name(path):
    """A name beside path that no other process uses: two runs writing at once never share a half-written file."""
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def save_checkpoint(path, model, **values):
    """
    Writes the model's weights and config with plain values (numbers, strings, lists, dicts, tensors; never a
    pickled object), so torch.load(path, weights_only=True) reads it. Written to a temporary file, then renamed:
    a crash or a full disk never leaves half a checkpoint, and the one written before stays. Non-finite weights
    are never written.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: not written: {len(bad)} tensors hold NaN or infinity, e.g. {bad[0]}")
    tmp = temporary_name(path)
    try:
        torch.save(dict(values, model=state, vit_config=dataclasses.asdict(model.cfg)), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its zip writer
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"{path}: not written ({first_line(err)}); {free_space(path)} free on that disk; the "
                              "checkpoints written before it are kept") from None


def first_line(err):
    """An exception as one line: its type and the first line of its message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def load_weights(path):
    """torch.load(path, weights_only=True), with a one-line CheckpointError for a file that is not such a pickle."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch's own warnings about a pickle's protocol: the line below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, or a pickle of Python objects that weights_only refuses
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"(\w[\w.]*)", pickled_globals(path))
        if found:
            raise CheckpointError(f"{path}: not a plain-tensor checkpoint: it holds a pickled {found.group(1)}, "
                                  "which was refused (weights_only loading never runs such code)") from None
        why = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))  # past torch's paragraph on its defaults
        raise CheckpointError(f"{path}: not a plain-tensor checkpoint ("
                              f"{why.group(1).strip() if why else first_line(err)})") from None


def pickled_globals(path):
    """The Python objects (module.name) a pickle file, or the data.pkl of a torch zip file, would build, other than
    torch's own and plain containers, as text: what weights_only loading refuses. Read with pickletools, never run."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                raw = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            with open(path, "rb") as f:
                raw = f.read()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(raw):
            if op.name in ("GLOBAL", "INST"):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle at all: nothing to name
        return ""
    return " ".join(g for g in found if not g.startswith(("torch.", "collections.OrderedDict", "builtins.")))


# what a checkpoint of this project holds and this code reads: an entry of another type is named, never a traceback
ENTRIES = {"model": (dict, "a dict of tensors"), "vit_config": (dict, "a dict of ViTConfig's fields"),
           "role": (str, "teacher, baseline or mlcak"), "res": (int, "an integer resolution"),
           "label_names": (list, "a list of label names"), "norm": (list, "[mean, std]"),
           "args": (dict, "the training flags as a dict"), "data": (dict, "the data's path and caches as a dict")}


def read_checkpoint(path):
    """The dict save_checkpoint wrote, loaded with weights_only=True, every entry this code reads checked
    (ENTRIES, and each ViTConfig field); CheckpointError (one line naming the entry) for anything else."""
    ckpt = load_weights(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "vit_config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' and 'vit_config' entries)")
    for key, (kind, what) in ENTRIES.items():
        value = ckpt.get(key)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if key == "model":
            ok = ok and all(isinstance(v, torch.Tensor) for v in value.values())
        elif key == "role":
            ok = value in ("teacher", "baseline", "mlcak")
        elif key == "label_names":
            ok = ok and all(isinstance(v, str) for v in value)
        elif key == "norm":
            ok = ok and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
        elif key == "data":
            ok = ok and all(isinstance(value.get(k), str) for k in ("path", "train_cache", "test_cache"))
        if not ok:
            held = "missing" if key not in ckpt else f"{type(value).__name__} {repr(value)[:40]}"
            raise CheckpointError(f"{path}: its entry '{key}' is {held}, expected {what}")
    fields = {f.name: f.type for f in dataclasses.fields(ViTConfig)}
    for key, value in ckpt["vit_config"].items():
        if key not in fields:
            raise CheckpointError(f"{path}: its vit_config has a field '{key}' this code does not know (a checkpoint of "
                                  "another version of vit.py?)")
        kind = {int: int, float: (int, float), str: str, tuple: (list, tuple)}[fields[key]]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: its vit_config field '{key}' is {type(value).__name__} {value!r}, expected "
                                  f"{fields[key].__name__}")
    return ckpt


def label_mismatch(trained, here, where):
    """Where a checkpoint's labels differ from those of `where` (this data, the test set), as "label 2 is 'TB', the
    test set's 'PNEUMONIA'", or None where they are the same."""
    if list(trained) == list(here):
        return None
    k = next((k for k, (a, b) in enumerate(zip(trained, here)) if a != b), None)
    if k is None:
        return f"it has {len(trained)} labels, {where} {len(here)}"
    return f"label {k + 1} is '{trained[k]}', {where}'s '{here[k]}'"


def run_name(ckpt):
    """teacher@224, baseline@28, mlcak@28: the role and the resolution the model sees."""
    return f"{ckpt['role']}@{ckpt['res']}"


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by save_checkpoint -> (VisionTransformer in eval mode, the checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:
        model = VisionTransformer(ViTConfig(**ckpt["vit_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as err:
        raise CheckpointError(f"{path}: its weights do not fit its vit_config ({first_line(err)[:160]})") from None
    return model.to(device).eval(), ckpt


# -------------------------------------------------------------------------------------------------- command line

def add_shared_flags(p):
    """The flags of train.py that bench.py takes too: the data, the batch, the device."""
    p.add_argument("--data", help="dataset folder or CSV file in a layout of README's 'Data' (default: synthetic "
                   "VinDr-style data in data/synthetic)")
    p.add_argument("--cache-dir", help="where decoded images are cached (default: data/cache in this project)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for forward and loss")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit code 2), not a usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _terminate(signum, frame):
    raise KeyboardInterrupt(signum)


def _block_sigterm():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _default_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _unblock_sigterm()


# A forked worker (a decoding pool, a data loader) must end at once on SIGTERM, as its pool expects, not raise in our
# handler. It is born with SIGTERM blocked and sets the default before unblocking it: a SIGTERM sent the moment it
# starts then kills it, where a Python handler would lose it (and the pool would wait for that worker for ever).
os.register_at_fork(before=_block_sigterm, after_in_parent=_unblock_sigterm, after_in_child=_default_sigterm)


def run_cli(main, argv, errors, resume=True):
    """
    main(argv) with the command line's exit codes: an error of the classes in errors is one line on stderr (exit 1);
    Ctrl-C, and SIGTERM as schedulers and `timeout` send it, end with one line (exit 130 and 143), which says how to
    go on where the command can resume.
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 (old zips) are printed as the disk has them
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    try:
        main(argv)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and not re.search(r"can't allocate memory|out of memory", str(err)):
            raise
        print(f"error: memory ran out ({first_line(err)[:120]}); lower --batch-size (and --workers), or run on a machine "
              "with more memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        terminated = err.args == (signal.SIGTERM,)
        how = ": run the same command with --resume to continue from the last finished epoch" if resume else ""
        print(f"\n{'terminated' if terminated else 'interrupted'}{how}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def pick_device(name):
    """--device: auto picks cuda, then mps, then cpu; a device that is not there is a ValueError."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU (or this torch is a CPU build)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps:
        raise ValueError(f"--device {name}: MPS is not available here")
    return device


# -------------------------------------------------------------------------------------------------- folders

@contextlib.contextmanager
def atomic_open(path, mode="w", **options):
    """A file opened under a temporary name beside path and renamed onto it when the block ends without an error, so
    that a reader never sees half a file: an interrupt, a crash or a full disk leaves the earlier one as it was, and
    two processes writing one path at once each leave a whole file (the last to finish)."""
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **options) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def writable(folder):
    """None if files can be written in folder (made if missing), else the reason."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{uuid.uuid4().hex}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror}"
    return None


def free_space(path):
    """The free space of the disk that holds path, as text ('1.2 GB')."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "an unknown amount"
    return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"


class Lock:
    """
    An exclusive lock on a folder's work (a hidden file in it, held by flock), so that two processes started at once
    never write one cache or one run folder together: the second waits for the first, then finds its work done.
    The operating system releases it when the holder ends, however it ends.
    """

    def __init__(self, path, what, enabled=True):
        self.path, self.what, self.enabled, self.file = path, what, enabled, None

    def __enter__(self):
        if not self.enabled:  # (under torchrun, rank 0 alone writes a run folder, so it alone takes its lock)
            return self
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            print(f"waiting for {holder}, which holds {self.what} ({self.path})", flush=True)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
        return False


class NotReady(Exception):
    """Another process is still making the data or the cache that this one would read."""


def progress_line(what, done, total, start):
    rate = done / max(time.time() - start, 1e-9)
    return f"{what}: {done}/{total} ({rate:.0f}/s, ETA {(total - done) / max(rate, 1e-9):.0f}s)"


_slot, _jobs_now = None, None  # in a worker process: its slot, and the shared array where it says which job it is on


def _start_worker(jobs_now, counter):
    global _slot, _jobs_now
    with counter.get_lock():
        _slot, counter.value = counter.value, counter.value + 1
    _jobs_now = jobs_now


def _run_chunk(fn, chunk):
    results = []
    for index, job in chunk:
        _jobs_now[_slot] = index
        results.append(fn(job))
    _jobs_now[_slot] = -1
    return results


class WorkerPool:
    """
    Worker processes for long work on every core (decoding a cache, drawing the synthetic set), as
    multiprocessing.Pool's imap and imap_unordered, except that a worker that dies (the kernel's OOM killer, a decoder
    plugin's crash) ends the work with a DataError naming what it was on, where a multiprocessing.Pool waits for its
    result for ever; and an interrupt (Ctrl-C, SIGTERM) ends the workers at once. describe(job) names a job.
    """

    def __init__(self, workers, describe=str, error=RuntimeError):
        self.describe, self.error = describe, error
        self.jobs_now = multiprocessing.Array("q", [-1] * workers, lock=False)  # each worker's job, -1 between jobs
        self.executor = ProcessPoolExecutor(workers, initializer=_start_worker,
                                            initargs=(self.jobs_now, multiprocessing.Value("i", 0)))

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is not None:  # an interrupt or an error: the workers end now, whatever they are on (the executor
            for process in list((getattr(self.executor, "_processes", None) or {}).values()):  # has no public way)
                process.terminate()
        self.executor.shutdown(wait=kind is None, cancel_futures=True)
        return False

    def _results(self, fn, jobs, chunksize, ordered):
        indexed = list(enumerate(jobs))
        futures = [self.executor.submit(_run_chunk, fn, indexed[i:i + chunksize]) for i in range(0, len(jobs), chunksize)]
        try:  # each result is let go once passed on: a cache's images together may not fit in memory
            if ordered:
                for k, future in enumerate(futures):
                    futures[k] = None
                    yield from future.result()
            else:
                pending = set(futures)
                del futures
                for future in as_completed(pending):
                    pending.discard(future)
                    yield from future.result()
        except BrokenProcessPool:
            on = [self.describe(jobs[i]) for i in self.jobs_now if 0 <= i < len(jobs)]
            raise self.error(f"a worker process ended abruptly (killed by the system: out of memory?) while on "
                             f"{' or '.join(on) or 'its work'}; nothing more was done") from None

    def imap(self, fn, jobs, chunksize=1):
        return self._results(fn, list(jobs), chunksize, ordered=True)

    def imap_unordered(self, fn, jobs, chunksize=1):
        return self._results(fn, list(jobs), chunksize, ordered=False)
