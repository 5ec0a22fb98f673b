import csv
import os

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

import data
import synthetic
from mlcak import simulate_low_resolution


def write_dicom(path, pixels, photometric="MONOCHROME2", syntax=ExplicitVRLittleEndian, **tags):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, "1.2.3.4"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    else:  # a compressed syntax: encapsulated bytes that only a decoder plugin could read
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


RAMP = np.tile(np.linspace(0, 4000, 16), (8, 1)).round()  # 8 x 16, stored values 0 .. 4000


def test_monochrome1_and_monochrome2_of_the_same_pixels_decode_to_inverse_images(tmp_path):
    mono2 = data.read_dicom(write_dicom(tmp_path / "m2.dcm", RAMP, "MONOCHROME2"))
    mono1 = data.read_dicom(write_dicom(tmp_path / "m1.dcm", RAMP, "MONOCHROME1"))
    assert mono2.dtype == np.float32 and mono2.min() == 0 and mono2.max() == 1
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)
    assert mono2[0, -1] == 1  # the highest stored value is white in MONOCHROME2


def test_window_is_applied_after_rescale_and_before_monochrome1_inversion(tmp_path):
    # stored v -> 2v - 1000 (rescale) -> window centre 3000, width 2000: 2000 .. 4000 maps to 0 .. 1
    path = write_dicom(tmp_path / "w.dcm", RAMP, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=3000, WindowWidth=2000)
    image = data.read_dicom(path)
    expected = np.clip((2 * RAMP - 1000 - 2000) / 2000, 0, 1)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    path1 = write_dicom(tmp_path / "w1.dcm", RAMP, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1000,
                        WindowCenter=3000, WindowWidth=2000)
    np.testing.assert_allclose(data.read_dicom(path1), 1 - expected, atol=1e-6)


def test_compressed_syntax_without_plugin_names_what_to_install(tmp_path):
    path = write_dicom(tmp_path / "ls.dcm", RAMP, syntax=JPEGLSLossless)
    with pytest.raises(data.DataError, match=r"ls\.dcm.*pip install pylibjpeg pylibjpeg-libjpeg"):
        data.read_dicom(str(path))


def test_corrupt_dicom_is_reported_by_name(tmp_path):
    path = tmp_path / "broken.dicom"
    path.write_bytes(b"DICM" + os.urandom(50))
    with pytest.raises(data.DataError, match="broken.dicom"):
        data.read_dicom(str(path))


def write_rows(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def vindr_folder(root, test_other="Other disease"):
    """A hand-made VinDr-CXR folder: two training images read by three readers, one test image."""
    globals_train = ["COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]
    globals_test = globals_train[:4] + [test_other, "No finding"]
    L = data.LOCAL_LABELS

    def row(ids, positives, no_finding):
        return ids + [int(n in positives) for n in L] + [0, 0, 0, 0, 0, no_finding]

    write_rows(root / "annotations" / "image_labels_train.csv", ["image_id", "rad_id"] + L + globals_train, [
        row(["a", "R1"], {"Cardiomegaly", "Nodule/Mass"}, 0),
        row(["a", "R2"], {"Cardiomegaly"}, 0),
        row(["a", "R3"], set(), 1),
        row(["b", "R1"], {"ILD"}, 0),  # one reader of three: positive for 'any', negative for 'majority'
        row(["b", "R4"], set(), 1),
        row(["b", "R5"], set(), 0),  # a reader who says neither finding nor 'No finding'
    ])
    write_rows(root / "annotations" / "image_labels_test.csv", ["image_id"] + L + globals_test,
               [row(["t"], {"Pleural effusion"}, 0)])
    box_header = ["class_name", "x_min", "y_min", "x_max", "y_max"]
    write_rows(root / "annotations" / "annotations_train.csv", ["image_id", "rad_id"] + box_header, [
        ["a", "R1", "Cardiomegaly", 10, 20, 30, 40], ["a", "R3", "No finding", "", "", "", ""],
        ["b", "R4", "Cardiomegally", 1, 2, 3, 4]])  # a misspelt class: not a box, but not dropped silently
    write_rows(root / "annotations" / "annotations_test.csv", ["image_id"] + box_header,
               [["t", "Pleural effusion", 0, 50, 40, 60]])
    for split, ids in (("train", "ab"), ("test", "t")):
        os.makedirs(root / split, exist_ok=True)
        for i in ids:
            write_dicom(root / split / f"{i}.dicom", RAMP)
    return root


def test_vindr_readers_majority_and_any(tmp_path):
    root = str(vindr_folder(tmp_path))
    major = data.load_source(root, "train", "majority")
    anyone = data.load_source(root, "train", "any")
    col = {name: k for k, name in enumerate(data.LOCAL_LABELS)}
    assert major.image_ids == ["a", "b"]
    assert major.local[0, col["Cardiomegaly"]] == 1 and major.local[0, col["Nodule/Mass"]] == 0
    assert major.local[1].sum() == 0 and list(major.abnormal) == [1, 0]
    assert anyone.local[0, col["Nodule/Mass"]] == 1 and anyone.local[1, col["ILD"]] == 1
    assert list(anyone.abnormal) == [1, 1]
    # b: normal by its local labels, but only one of three readers said 'No finding': counted, not hidden
    assert any(note.startswith("train: 1 of 2 images") for note in major.notes)
    np.testing.assert_array_equal(major.boxes, [[0, col["Cardiomegaly"], 10, 20, 30, 40]])
    assert any("outside the label set not used: Cardiomegally" in note for note in major.notes)


@pytest.mark.parametrize("spelling", ["Other disease", "Other diseases"])
def test_vindr_test_split_accepts_both_spellings(tmp_path, spelling):
    test = data.load_source(str(vindr_folder(tmp_path, spelling)), "test")
    assert test.image_ids == ["t"] and test.local[0, data.LOCAL_LABELS.index("Pleural effusion")] == 1
    assert test.boxes.shape == (1, 6)


def test_missing_column_file_and_folder_are_named(tmp_path):
    root = vindr_folder(tmp_path)
    os.remove(root / "train" / "b.dicom")
    with pytest.raises(data.DataError, match=r"b\.dicom: listed in .*image_labels_train.csv but no such file"):
        data.load_source(str(root), "train")
    with pytest.raises(data.DataError, match="no such file or folder"):
        data.load_source(str(tmp_path / "nowhere"), "train")
    write_rows(tmp_path / "x.csv", ["path", "split"], [["a.png", "train"]])
    with pytest.raises(data.DataError, match="no label columns"):
        data.load_source(str(tmp_path / "x.csv"), "train")
    write_rows(tmp_path / "y.csv", ["file", "Cardiomegaly"], [["a.png", 1]])
    with pytest.raises(data.DataError, match="missing column 'path'"):
        data.load_source(str(tmp_path / "y.csv"), "train")


def test_kaggle_layout_and_its_deterministic_split(tmp_path):
    rows = []
    for n in range(40):
        image_id = f"img{n:03d}"
        for rad in ("R8", "R9", "R10"):
            rows.append([image_id, "Cardiomegaly" if n % 2 and rad != "R10" else "No finding",
                         3 if n % 2 and rad != "R10" else 14, rad, 1, 2, 3, 4])
        os.makedirs(tmp_path / "train", exist_ok=True)
        write_dicom(tmp_path / "train" / f"{image_id}.dicom", RAMP)
    write_rows(tmp_path / "train.csv", ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max",
                                        "y_max"], rows)
    train, test = data.load_source(str(tmp_path), "train"), data.load_source(str(tmp_path), "test")
    assert set(train.image_ids) | set(test.image_ids) == {f"img{n:03d}" for n in range(40)}
    assert not set(train.image_ids) & set(test.image_ids)
    assert test.image_ids == sorted(i for i in test.image_ids if data.hash_fraction(i) < 0.2) and 2 <= len(test.image_ids) <= 16
    assert train.label_names == data.KAGGLE_LABELS and len(train.label_names) == 14
    card = train.label_names.index("Cardiomegaly")
    odd = np.array([int(i[3:]) % 2 for i in train.image_ids])
    np.testing.assert_array_equal(train.local[:, card], odd)  # two of three readers: positive by majority


def test_csv_format_with_8_and_16_bit_pngs(tmp_path):
    os.makedirs(tmp_path / "img")
    Image.fromarray(np.full((30, 20), 128, np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(tmp_path / "img" / "b.png")
    write_rows(tmp_path / "set.csv", ["path", "Pneumonia", "Effusion", "split"],
               [["img/a.png", 1, 0, "train"], ["img/b.png", 0, 0, "train"], ["img/a.png", 0, 1, "test"]])
    train = data.load_source(str(tmp_path / "set.csv"), "train")
    assert train.label_names == ["Pneumonia", "Effusion"] and train.local.tolist() == [[1, 0], [0, 0]]
    assert train.abnormal.tolist() == [1, 0]
    assert abs(data.read_image(train.paths[0]).mean() - 128 / 255) < 1e-6
    assert data.read_image(train.paths[1]).min() == 1.0
    folder = data.build_cache(train, 16, str(tmp_path / "cache"), workers=1, verbose=False)
    ds = data.XrayDataset(folder)
    assert ds[0][0].shape == (1, 16, 16) and abs(ds[0][0].mean().item() - 128 / 255) < 0.01
    write_rows(tmp_path / "bad.csv", ["path", "Pneumonia"], [["img/a.png", "yes"]])
    with pytest.raises(data.DataError, match="column 'Pneumonia' holds 'yes'"):
        data.load_source(str(tmp_path / "bad.csv"), "train")


def test_cache_round_trip_with_boxes_and_a_corrupt_file_skipped(tmp_path):
    root = vindr_folder(tmp_path)
    (root / "train" / "b.dicom").write_bytes(b"not a dicom at all")
    source = data.load_source(str(root), "train")
    folder = data.build_cache(source, 32, str(tmp_path / "cache"), workers=2, verbose=False)
    ds = data.XrayDataset(folder)
    assert len(ds) == 1 and ds.image_ids[int(ds.indices[0])] == "a"  # b was skipped, not silently kept
    skipped = open(os.path.join(folder, "skipped.txt")).read()
    assert "b.dicom" in skipped and "a.dicom" not in skipped
    image, local, abnormal, index = ds[0]
    expected = data.resize_uint8(data.read_dicom(str(root / "train" / "a.dicom")), 32)
    np.testing.assert_array_equal((image[0].numpy() * 255).round(), expected)
    assert local.shape == (22,) and abnormal == 1 and index == 0
    np.testing.assert_allclose(ds.boxes(0), [[3, 10 * 32 / 16, 20 * 32 / 8, 30 * 32 / 16, 40 * 32 / 8]])
    assert data.build_cache(source, 32, str(tmp_path / "cache")) == folder  # complete: reused
    assert data.build_cache(source, 16, str(tmp_path / "cache")) != folder  # another size: another cache


def test_interrupted_cache_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    root = str(synthetic.make_synthetic(str(tmp_path / "syn"), n_train=12, n_test=2, workers=1, verbose=False))
    source = data.load_source(root, "train")
    cache = str(tmp_path / "cache")
    calls = []
    real = data._decode_one

    def failing_after_five(job):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(data, "_decode_one", failing_after_five)
    monkeypatch.setattr(data, "Pool", InlinePool)
    with pytest.raises(KeyboardInterrupt):
        data.build_cache(source, 24, cache, verbose=False)
    folder = os.path.join(cache, os.listdir(cache)[0])
    assert not os.path.exists(os.path.join(folder, "meta.json")) and np.load(os.path.join(folder, "done.npy")).sum() == 5
    calls.clear()
    monkeypatch.setattr(data, "_decode_one", real)
    data.build_cache(source, 24, cache, verbose=False)
    ds = data.XrayDataset(folder)
    assert len(ds) == 12
    for n in range(12):
        np.testing.assert_array_equal(ds.images[n], data.resize_uint8(data.read_dicom(source.paths[n]), 24))


class InlinePool:
    """Pool stand-in that runs jobs in this process, so a test can interrupt a build at a chosen image."""

    def __init__(self, workers=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs, chunksize=1):
        return map(fn, jobs)

    imap = imap_unordered


def test_synthetic_generator_is_byte_identical_for_a_seed(tmp_path):
    a = synthetic.make_synthetic(str(tmp_path / "a"), n_train=6, n_test=3, seed=7, workers=2, verbose=False)
    b = synthetic.make_synthetic(str(tmp_path / "b"), n_train=6, n_test=3, seed=7, workers=1, verbose=False)
    c = synthetic.make_synthetic(str(tmp_path / "c"), n_train=6, n_test=3, seed=8, workers=1, verbose=False)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len(files) == 6 + 3 + 4 + 1
    for f in files:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    assert open(os.path.join(a, "annotations", "image_labels_test.csv")).read() != \
        open(os.path.join(c, "annotations", "image_labels_test.csv")).read()
    train = data.load_source(a, "train")
    assert len(train.image_ids) == 6 and {len(set(r["rad_id"] for r in csv.DictReader(
        open(os.path.join(a, "annotations", "image_labels_train.csv"))) if r["image_id"] == i)) for i in train.image_ids} == {3}


@pytest.mark.parametrize("label", sorted(set(data.LOCAL_LABELS) - {"Mediastinal shift"}))
def test_each_synthetic_finding_is_drawn_inside_its_box(label):
    h, w = 224, 208
    plain, _ = synthetic.synthetic_chest(np.random.default_rng(3), h, w, [])
    drawn, boxes = synthetic.synthetic_chest(np.random.default_rng(3), h, w, [label])
    (name, x0, y0, x1, y1), = boxes
    assert name == label
    diff = np.abs(drawn.astype(np.float64) - plain)
    inside = diff[int(y0 * h):int(np.ceil(y1 * h)) + 1, int(x0 * w):int(np.ceil(x1 * w)) + 1].sum()
    assert diff.sum() > 0.5 and inside >= 0.8 * diff.sum(), (inside, diff.sum())


def test_fine_findings_vanish_at_28_and_coarse_ones_stay():
    # the point of the synthetic set: what a finding changes in the image, seen at 224 and after 28 x 28
    low = lambda image: simulate_low_resolution(torch.from_numpy(image)[None, None], 28)[0, 0].numpy()
    for label in data.LOCAL_LABELS:
        for seed in (0, 1):
            plain, _ = synthetic.synthetic_chest(np.random.default_rng(seed), 224, 224, [])
            drawn, _ = synthetic.synthetic_chest(np.random.default_rng(seed), 224, 224, [label])
            kept = np.abs(low(drawn) - low(plain)).sum() / np.abs(drawn - plain).sum()
            assert (kept > 0.9) if label in synthetic.COARSE else (kept < 0.5), (label, seed, kept)


def test_synthetic_test_labels_and_boxes_agree(tmp_path):
    root = synthetic.make_synthetic(str(tmp_path / "s"), n_train=2, n_test=20, seed=1, workers=1, verbose=False)
    test = data.load_source(root, "test")
    boxed = np.zeros_like(test.local)
    boxed[test.boxes[:, 0].astype(int), test.boxes[:, 1].astype(int)] = 1
    np.testing.assert_array_equal(boxed, test.local)
    assert 0 < test.abnormal.sum() < 20
