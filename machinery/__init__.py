"""
The machinery: everything the five top-level files need that is not the paper, and that a first reading may skip.

    layouts.py          the chest X-ray datasets as downloaded (VinDr, Kaggle, NIH, CheXpert, folders, CSV)
    decode.py           DICOM and PNG/JPEG/... to grey pixels
    cache.py            decoded images on disk; a training stage's per-image results in memory (StageCache)
    synthetic.py        the synthetic default data set (python -m machinery.synthetic)
    runs.py             run folders, the optimizer and its schedule, --resume, DDP, log.csv, checkpoints of a run
    runtime.py          checkpoint files, the command line's one-line errors, signals, devices, locks
    bootstrap.py        the bootstrap: intervals, paired differences, the pooled test over seeds
    tables.py           the printed and Markdown tables
    attention_maps.py   attention maps scored against boxes and drawn (the paper's Fig. 3)
    pretrained.py       timm/DeiT weights for --init
    bench.py            speed (python -m machinery.bench)

Imports go one way: train.py, evaluate.py and data.py import this folder; it imports vit.py and mlcak.py (which
import torch alone) and never train.py, evaluate.py or data.py (bench.py, a program of its own, aside).
"""
