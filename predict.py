"""
The models in use: probabilities for a dataset's images (what evaluate.py scores and train.py validates on), and
for your own X-rays, unlabelled files of any size, as `python evaluate.py CKPT --images PATH ...` runs it.

    predict(model, dataset, res, norm)       local probabilities (N, L) and P(abnormal) (N,), in dataset order
    predict_images(checkpoints, paths)       a line per image, predictions.csv, and with maps=DIR the attention figures

Your files enter a model exactly as the training images did: decoded by decode.read_image (DICOM windowing, EXIF
orientation), squashed to the checkpoint's --img-size in a cache (data.build_cache: a 1024-px DICOM is reduced, a
smaller image enlarged, by the same antialiased bicubic), then reduced to the model's own resolution by
mlcak.model_input. So a 28-px student sees a 28 x 28 image, as it did in training.
"""

import csv
import os

import numpy as np
import torch

import data
import layouts
from maps import write_figures
from mlcak import model_input
from runtime import load_checkpoint, run_name


@torch.no_grad()
def predict(model, dataset, res, norm, device, batch_size=32):
    """Returns local probabilities (N, L), P(abnormal) (N,), and the matching targets, in dataset order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    local, abnormal, y_local, y_abnormal = [], [], [], []
    for images, targets, target_abnormal, _ in loader:
        z_local, z_global, _ = model(model_input(images.to(device), res, norm))
        local.append(torch.sigmoid(z_local).float().cpu())
        abnormal.append(torch.softmax(z_global.float(), dim=-1)[:, 1].cpu())
        y_local.append(targets)
        y_abnormal.append(target_abnormal)
    return (torch.cat(local).numpy(), torch.cat(abnormal).numpy(), torch.cat(y_local).numpy(),
            torch.cat(y_abnormal).numpy())


def image_files(paths):
    """The files to predict, paths kept as given: each file named, and the images (by extension) in each folder named
    and below it, sorted; hidden names (.DS_Store, .ipynb_checkpoints/) left out. Returns (files, other files)."""
    files, others = [], []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
            continue
        if not os.path.isdir(path):
            raise data.DataError(f"--images {path}: no such file or folder")
        for folder, subfolders, names in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                (files if name.lower().endswith(layouts.IMAGE_EXTENSIONS) else others).append(os.path.join(folder, name))
    return files, others


def image_dataset(files, label_names, size, cache_dir=None):
    """The files as an unlabelled dataset (its targets are zeros), decoded and cached as training images are; and
    the files that could not be read, each with its reason."""
    n = len(files)
    source = layouts.Source("images", "predict", list(files), [os.path.abspath(f) for f in files], list(label_names),
                            np.zeros((n, len(label_names)), np.uint8), np.zeros(n, np.uint8), np.zeros((0, 6), np.float32),
                            [], np.zeros((n, 2), np.float32), list(files), np.zeros(n, bool))
    folder = data.build_cache(source, size, cache_dir, verbose=False)
    with open(os.path.join(folder, "skipped.txt")) as f:
        return data.XrayDataset(folder), f.read().splitlines()


def predict_images(checkpoints, paths, threshold=0.5, out_csv=None, maps=None, cache_dir=None, device="cpu"):
    """
    Every model on every readable image: one line per image and model with P(abnormal) and the local labels whose
    probability is at least threshold (else the three most probable), all probabilities in out_csv (default:
    predictions.csv beside the first checkpoint; a row per image and model, a column per label), and with maps the
    figures of evaluate.py --maps: the image as each model saw it, its MLCAK attention over it, side by side.
    Unreadable files are listed and skipped; none readable at all is a DataError. Returns the CSV's path.
    """
    files, others = image_files(paths)
    loaded = [load_checkpoint(p, device) for p in checkpoints]
    first = loaded[0][1]
    for path, (_, ckpt) in zip(checkpoints, loaded):
        if (ckpt["vit_config"]["img_size"], ckpt["label_names"]) != (first["vit_config"]["img_size"], first["label_names"]):
            raise data.DataError(f"{path}: another --img-size or other labels than {checkpoints[0]}; give models of one run")
    dataset, skipped = image_dataset(files, first["label_names"], first["vit_config"]["img_size"], cache_dir)
    for reason in skipped:
        print(f"skipped: {reason}")
    if others:
        print(f"ignored {len(others)} files that are not images by their names, e.g. {others[0]}")
    if not len(dataset):
        raise data.DataError(f"--images {' '.join(paths)}: none of the {len(files)} files is a readable image"
                             + (f" (first: {skipped[0]})" if skipped else ""))
    rows = [int(n) for n in dataset.indices]
    out_csv = out_csv or os.path.join(os.path.dirname(os.path.abspath(checkpoints[0])), "predictions.csv")
    names = first["label_names"]
    with open(out_csv, "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["path", "model", "abnormal"] + names)
        for model, ckpt in loaded:
            local, abnormal, _, _ = predict(model, dataset, ckpt["res"], ckpt["norm"], device)
            print(f"\n{run_name(ckpt)}: P(abnormal), and the local labels at p >= {threshold:g} (else the three most probable)")
            for k, n in enumerate(rows):
                order = np.argsort(-local[k], kind="stable")
                above = [j for j in order if local[k, j] >= threshold]
                found = ", ".join(f"{names[j]} {local[k, j]:.2f}" for j in (above or order[:3]))
                if not above:
                    found = f"none; highest {found}"
                print(f"{dataset.image_ids[n]}  abnormal {abnormal[k]:.3f}  {found}")
                table.writerow([dataset.image_ids[n], run_name(ckpt), f"{abnormal[k]:.6f}"] + [f"{p:.6f}" for p in local[k]])
    print(f"\nwrote {len(rows)} images x {len(loaded)} model(s) to {out_csv}")
    if maps:
        count = write_figures(maps, dataset, loaded, rows, device)
        print(f"wrote {count} figures and overview.png to {maps}")
    return out_csv
