"""Decoding, the cache and its damage, validation and leaks (data.py); the layouts have their tests in test_layouts.py."""

import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGLSLossless

import data
import machinery.cache
from helpers import RAMP, vindr_folder, write_dicom, write_image, write_rows
from machinery import decode, layouts, runtime, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "dicom")


def test_monochrome1_and_monochrome2_of_the_same_pixels_decode_to_inverse_images(tmp_path):
    mono2 = decode.read_dicom(write_dicom(tmp_path / "m2.dcm", RAMP, "MONOCHROME2"))
    mono1 = decode.read_dicom(write_dicom(tmp_path / "m1.dcm", RAMP, "MONOCHROME1"))
    assert mono2.dtype == np.float32 and mono2.min() == 0 and mono2.max() == 1
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)
    assert mono2[0, -1] == 1  # the highest stored value is white in MONOCHROME2


def test_window_is_applied_after_rescale_and_before_monochrome1_inversion(tmp_path):
    # stored v -> 2v - 1000 (rescale) -> window centre 3000, width 2000: 2000 .. 4000 maps to 0 .. 1
    path = write_dicom(tmp_path / "w.dcm", RAMP, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=3000, WindowWidth=2000)
    expected = np.clip((2 * RAMP - 1000 - 2000) / 2000, 0, 1)
    np.testing.assert_allclose(decode.read_dicom(path), expected, atol=1e-6)
    path1 = write_dicom(tmp_path / "w1.dcm", RAMP, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1000,
                        WindowCenter=3000, WindowWidth=2000)
    np.testing.assert_allclose(decode.read_dicom(path1), 1 - expected, atol=1e-6)


def test_a_voi_lut_keeps_its_output_range_and_warns_nothing(tmp_path, recwarn):
    # a 12-bit LUT over stored values 0 .. 4000 whose outputs run 400 .. 1600 of 0 .. 4095: a dim, low-contrast view
    from pydicom.dataset import Dataset
    item = Dataset()
    item.add_new(0x00283002, "US", [4001, 0, 12])  # LUT Descriptor: entries, first stored value, bits
    item.add_new(0x00283006, "US", np.linspace(400, 1600, 4001).round().astype(int).tolist())  # LUT Data
    path = write_dicom(tmp_path / "lut.dcm", RAMP, RescaleSlope=1, RescaleIntercept=0, VOILUTSequence=[item])
    image = decode.read_dicom(str(path))
    assert image.min() == pytest.approx(400 / 4095, abs=1e-6) and image.max() == pytest.approx(1600 / 4095, abs=1e-6)
    assert not [w for w in recwarn if "VOI LUT" in str(w.message)]


def test_a_rescale_slope_of_zero_or_a_constant_image_is_refused_by_name(tmp_path):
    flat = write_dicom(tmp_path / "slope0.dcm", RAMP, RescaleSlope=0, RescaleIntercept=0)
    with pytest.raises(data.DataError, match=r"slope0\.dcm: every pixel decodes to the same grey \(its RescaleSlope is 0\)"):
        decode.read_dicom(str(flat))
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(data.DataError, match=r"flat\.png: every pixel is the same grey"):
        decode.read_image(str(tmp_path / "flat.png"))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"empty\.png: an empty file"):
        decode.read_image(str(tmp_path / "empty.png"))


def test_a_jpeg_is_turned_upright_by_its_exif_orientation(tmp_path):
    upright = np.zeros((20, 40), np.uint8)
    upright[:, :20] = 250  # bright left half, landscape
    stored = Image.fromarray(np.rot90(upright).copy())  # stored on its side (portrait), as a phone writes it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    stored.save(tmp_path / "side.jpg", exif=exif, quality=95)
    image = decode.read_image(str(tmp_path / "side.jpg"))
    assert image.shape == (20, 40) and image[:, :15].mean() > 0.9 and image[:, 25:].mean() < 0.1


def test_a_dicom_without_file_meta_decodes_like_one_with_it(tmp_path):
    with_meta = write_dicom(tmp_path / "meta.dcm", RAMP, "MONOCHROME1", WindowCenter=2000, WindowWidth=3000)
    without = write_dicom(tmp_path / "old.dcm", RAMP, "MONOCHROME1", file_meta=False, WindowCenter=2000, WindowWidth=3000)
    assert open(without, "rb").read(132)[128:132] != b"DICM"  # really no preamble and no meta header
    np.testing.assert_array_equal(decode.read_dicom(str(without)), decode.read_dicom(str(with_meta)))


def test_a_colour_dicom_is_made_grey_and_a_multi_frame_one_is_named(tmp_path):
    rgb = np.zeros((8, 16, 3))
    rgb[:, :8, 0] = 4095  # left half pure red, right half pure blue, at the 12-bit maximum
    rgb[:, 8:, 2] = 4095
    image = decode.read_dicom(str(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB")))
    assert image.shape == (8, 16)
    np.testing.assert_allclose(image[:, :8], 0.299, atol=1e-6)  # the luma of red and of blue
    np.testing.assert_allclose(image[:, 8:], 0.114, atol=1e-6)
    frames = write_dicom(tmp_path / "frames.dcm", np.concatenate([RAMP, RAMP]), NumberOfFrames=2)
    frames_ds = pydicom.dcmread(frames)
    frames_ds.Rows = 8  # two 8 x 16 frames, one after the other
    frames_ds.save_as(frames)
    with pytest.raises(data.DataError, match=r"frames\.dcm: a DICOM of 2 frames; a radiograph has one"):
        decode.read_dicom(str(frames))


def test_compressed_syntax_without_plugin_names_what_to_install(tmp_path):
    path = write_dicom(tmp_path / "ls.dcm", RAMP, syntax=JPEGLSLossless)
    with pytest.raises(data.DataError, match=r"ls\.dcm.*pip install pylibjpeg pylibjpeg-libjpeg"):
        decode.read_dicom(str(path))


def test_corrupt_dicom_is_reported_by_name(tmp_path):
    path = tmp_path / "broken.dicom"
    path.write_bytes(b"DICM" + os.urandom(50))
    with pytest.raises(data.DataError, match="broken.dicom"):
        decode.read_dicom(str(path))


@pytest.mark.parametrize("window", [False, True])
def test_an_8_bit_voi_lut_over_12_bit_values_looks_up_each_value_not_its_low_byte(tmp_path, window):
    from pydicom.dataset import Dataset
    stored = np.tile(np.arange(0, 4096, 64), (16, 1))  # 16 x 64, 12-bit values
    lut = np.linspace(0, 255, 4096).round().astype(int)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 8])  # 4,096 entries from stored value 0, 8-bit outputs
    item.add_new(0x00283006, "US", lut.tolist())
    tags = dict(WindowCenter=100, WindowWidth=50) if window else {}  # a window beside the LUT: the LUT wins
    image = decode.read_dicom(str(write_dicom(tmp_path / "lut8.dcm", stored, VOILUTSequence=[item], **tags)))
    np.testing.assert_allclose(image, lut[stored] / 255, atol=1e-6)  # 0 .. 1, not 0 .. 0.06


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_tiff_with_nan_or_infinite_pixels_keeps_its_finite_ones(tmp_path, bad):
    values = np.tile(np.linspace(100.0, 200.0, 32, dtype=np.float32), (32, 1))
    values[:4, :4] = bad  # a masked corner, or one saturated pixel
    Image.fromarray(values, mode="F").save(tmp_path / "x.tif")
    image = decode.read_image(str(tmp_path / "x.tif"))
    assert np.isfinite(image).all() and image[8:, 0].max() == 0 and image[8:, -1].min() == 1  # the ramp spread 0 .. 1
    assert (image[:4, :4] == (1 if bad == np.inf else 0)).all()
    Image.fromarray(np.full((32, 32), np.nan, np.float32), mode="F").save(tmp_path / "masked.tif")
    with pytest.raises(data.DataError, match=r"masked.tif: no pixel is a finite number"):
        decode.read_image(str(tmp_path / "masked.tif"))


def test_an_image_of_one_row_is_named_with_its_aspect_not_stretched(tmp_path):
    Image.fromarray(np.arange(1000, dtype=np.uint8)[None].repeat(1, 0)).save(tmp_path / "line.png")
    with pytest.raises(data.DataError, match=r"line.png: 1000 x 1 pixels, an aspect of 1:1000 \(at most 1:4"):
        decode.read_image(str(tmp_path / "line.png"))
    path = write_dicom(tmp_path / "line.dcm", np.tile(np.arange(0, 4096, dtype=np.uint16), (1, 1)))
    with pytest.raises(data.DataError, match=r"line.dcm: 4096 x 1 pixels, an aspect of 1:4096"):
        decode.read_dicom(str(path))


def test_a_dicom_claiming_a_huge_image_is_refused_by_its_header_before_decoding(tmp_path, monkeypatch):
    from pydicom.uid import RLELossless
    path = write_dicom(tmp_path / "bomb.dcm", RAMP, syntax=RLELossless)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535  # 4.5 KB on disk, 8.6 GB as claimed
    ds.save_as(path)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(lambda self: pytest.fail("decoded")))
    with pytest.raises(data.DataError, match=r"bomb.dcm: 65535 x 65535 pixels \(4295 million; at most 100 million"):
        decode.read_dicom(str(path))


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/dicom is not here (a user's clone)")
def test_real_radiographs_decode_with_dark_lungs_or_name_their_plugin():
    no_meta = decode.read_dicom(os.path.join(SHARED, "chest-cr-mono1-10bit-no-meta.dcm"))
    assert no_meta.shape == (440, 440) and 0.2 < no_meta.mean() < 0.8
    mono2 = decode.read_dicom(os.path.join(SHARED, "chest-cr-mono2-jpeg-baseline.dcm"))
    mono1 = decode.read_dicom(os.path.join(SHARED, "chest-cr-same-pixels-tagged-mono1.dcm"))
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)  # the same pixels, tagged MONOCHROME1: inverted
    for image in (no_meta, mono2):  # a chest radiograph shown right: lungs (left and right of centre) darker than the spine
        h, w = image.shape
        lungs = image[h // 3:2 * h // 3, w // 5:2 * w // 5].mean() + image[h // 3:2 * h // 3, 3 * w // 5:4 * w // 5].mean()
        assert lungs / 2 < image[h // 3:2 * h // 3, 9 * w // 20:11 * w // 20].mean()
    for name in ("chest-cr-mono1-15bit-jpeg2000.dcm", "chest-cr-mono1-15bit-jpegls.dcm", "cr-mono1-jpeg-lossless-modality-lut-seq.dcm"):
        try:
            image = decode.read_dicom(os.path.join(SHARED, name))
            assert image.dtype == np.float32 and 0 <= image.min() < image.max() <= 1
        except data.DataError as err:  # no decoder installed: the message names the file and what to install
            assert name in str(err) and "pip install pylibjpeg" in str(err)


def test_a_16_bit_png_of_12_bit_values_keeps_its_grey_levels(tmp_path):
    values = np.tile(np.arange(0, 4096, 4, dtype=np.uint16), (256, 1))  # 12-bit values in a 16-bit PNG
    Image.fromarray(values).save(tmp_path / "x.png")
    image = decode.read_image(str(tmp_path / "x.png"))
    assert image.min() == 0 and image.max() == 1
    assert len(np.unique(decode.resize_uint8(image, 256))) > 200  # not 17 levels, as with a division by 65535


def test_csv_with_8_and_16_bit_pngs_a_byte_order_mark_and_an_excel_header(tmp_path):
    os.makedirs(tmp_path / "img")
    Image.fromarray(np.repeat([[127, 129]], 30, axis=0).repeat(10, axis=1).astype(np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray((RAMP * 16).astype(np.uint16)).save(tmp_path / "img" / "b.png")
    # what Excel writes: a byte-order mark before the first column, here a label
    write_rows(tmp_path / "set.csv", ["Pneumonia", "path", "Effusion", "split"],
               [[1, "img/a.png", 0, "train"], [0, "img/b.png", 0, "train"], [0, "img/a.png", 1, "test"]], bom=True)
    train = layouts.load_source(str(tmp_path / "set.csv"), "train")
    assert train.label_names == ["Pneumonia", "Effusion"] and train.local.tolist() == [[1, 0], [0, 0]]
    assert train.abnormal.tolist() == [1, 0]
    assert abs(decode.read_image(train.paths[0]).mean() - 128 / 255) < 1e-6
    folder = data.build_cache(train, 16, str(tmp_path / "cache"), workers=1, verbose=False)
    ds = data.XrayDataset(folder)
    assert ds[0][0].shape == (1, 16, 16) and abs(ds[0][0].mean().item() - 128 / 255) < 0.01


def csv_set(tmp_path, n=60, patients=None, split=False):
    rows = []
    for k in range(n):
        write_image(tmp_path / "img" / f"{k}.png", k, k % 3 == 0)
        rows.append([f"img/{k}.png", int(k % 3 == 0)] + ([f"p{k % patients}"] if patients else []) + (["train"] if split else []))
    header = ["path", "Nodule"] + (["patient_id"] if patients else []) + (["split"] if split else [])
    write_rows(tmp_path / "set.csv", header, rows)
    return str(tmp_path / "set.csv")


def cached(sources, tmp_path):
    return {s: data.XrayDataset(data.build_cache(src, 16, str(tmp_path / "cache"), workers=1, verbose=False))
            for s, src in sources.items()}


def test_without_split_or_ids_test_and_validation_are_disjoint_and_both_drawn(tmp_path):
    # the bug: test and validation were both chosen by the same unsalted hash, so validation was always empty
    sets = cached(layouts.load_sources(csv_set(tmp_path)), tmp_path)
    train, test = sets["train"], sets["test"]
    val = data.validation_rows(train, 0.25)
    assert len(test) > 0 and len(val) > 0 and len(val) < len(train)
    val_ids = {train.image_ids[n] for n in val}
    assert not val_ids & set(test.image_ids) and val_ids <= set(train.image_ids)
    assert len(data.validation_rows(train, 0.0)) == 0


def test_a_patient_is_never_in_two_splits(tmp_path):
    sources = layouts.load_sources(csv_set(tmp_path, n=80, patients=20))
    train, test = sources["train"], sources["test"]
    assert set(train.groups).isdisjoint(test.groups) and len(set(test.groups)) >= 1
    assert train.groups[0] == "p0" or "p0" in test.groups  # the patient column is the group
    sets = cached(sources, tmp_path)
    val = data.validation_rows(sets["train"], 0.3)
    val_patients = {sets["train"].groups[n] for n in val}
    rest = {sets["train"].groups[n] for n in np.setdiff1d(sets["train"].indices, val)}
    assert val_patients and val_patients.isdisjoint(rest)


def test_the_same_image_twice_is_reported_within_and_across_splits(tmp_path):
    write_image(tmp_path / "a.png", 1, True)
    write_image(tmp_path / "b.png", 2, False)
    write_image(tmp_path / "c.png", 3, True)
    Image.open(tmp_path / "a.png").save(tmp_path / "a-copy.png")  # another file, the same pixels
    write_rows(tmp_path / "leak.csv", ["path", "Nodule", "split", "patient_id"],
               [["a.png", 1, "train", "p1"], ["a-copy.png", 1, "train", "p2"], ["b.png", 0, "train", "p3"],
                ["a.png", 1, "test", "p4"], ["c.png", 1, "test", "p3"]])
    sets = cached(layouts.load_sources(str(tmp_path / "leak.csv")), tmp_path)
    notes = data.overlap_notes(sets)
    assert "train: 1 images repeat another image of train (the same pixels)" in notes
    assert any(n.startswith("leak: 1 images of test are also in train (the same pixels), e.g. a.png") for n in notes)
    assert any(n.startswith("leak: 1 patients have images in both train and test, e.g. p3") for n in notes)


def test_cache_round_trip_with_boxes_and_a_corrupt_file_skipped(tmp_path):
    root = vindr_folder(tmp_path)
    (root / "train" / "b.dicom").write_bytes(b"not a dicom at all")
    source = layouts.load_source(str(root), "train")
    folder = data.build_cache(source, 32, str(tmp_path / "cache"), workers=2, verbose=False)
    ds = data.XrayDataset(folder)
    assert len(ds) == 1 and ds.image_ids[int(ds.indices[0])] == "a"  # b was skipped, not silently kept
    skipped = open(os.path.join(folder, "skipped.txt")).read()
    assert "b.dicom" in skipped and "a.dicom" not in skipped
    image, local, abnormal, index = ds[0]
    expected = decode.resize_uint8(decode.read_dicom(str(root / "train" / "a.dicom")), 32)
    np.testing.assert_array_equal((image[0].numpy() * 255).round(), expected)
    assert local.shape == (22,) and abnormal == 1 and index == 0
    np.testing.assert_allclose(ds.boxes(0), [[3, 2 * 32 / 16, 1 * 32 / 8, 6 * 32 / 16, 4 * 32 / 8]])
    assert data.build_cache(source, 32, str(tmp_path / "cache")) == folder  # complete: reused
    assert data.build_cache(source, 16, str(tmp_path / "cache")) != folder  # another size: another cache
    assert len(data.XrayDataset(folder, [])) == 0  # an empty selection is empty, not a float array


def test_a_file_rewritten_with_its_old_size_and_time_is_decoded_again(tmp_path):
    # as touch -r leaves it: the same size and modification time, other pixels; the change time tells it apart
    write_image(tmp_path / "img" / "a.png", 1, True)
    write_image(tmp_path / "img" / "b.png", 2, False)
    write_rows(tmp_path / "set.csv", ["path", "Nodule", "split"], [["img/a.png", 1, "train"], ["img/b.png", 0, "test"]])
    source = layouts.load_source(str(tmp_path / "set.csv"), "train")
    first = data.build_cache(source, 16, str(tmp_path / "cache"), workers=1, verbose=False)
    before = os.stat(tmp_path / "img" / "a.png")
    Image.fromarray(255 - np.asarray(Image.open(tmp_path / "img" / "a.png"))).save(tmp_path / "img" / "a.png")
    os.utime(tmp_path / "img" / "a.png", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(tmp_path / "img" / "a.png") == before.st_size  # (the inverse of noise: the same PNG size)
    second = data.build_cache(layouts.load_source(str(tmp_path / "set.csv"), "train"), 16, str(tmp_path / "cache"),
                              workers=1, verbose=False)
    assert second != first
    np.testing.assert_array_equal(data.XrayDataset(second).images[0], 255 - data.XrayDataset(first).images[0])


def test_rebuild_decodes_a_complete_cache_again(tmp_path, monkeypatch):
    source, cache = synthetic_train(tmp_path)
    monkeypatch.setattr(machinery.cache, "DecoderPool", InlinePool)
    folder = data.build_cache(source, 24, cache, verbose=False)
    decoded = []
    real = machinery.cache._decode_one
    monkeypatch.setattr(machinery.cache, "_decode_one", lambda job: decoded.append(job[0]) or real(job))
    assert data.build_cache(source, 24, cache, verbose=False) == folder and decoded == []  # complete: reused
    assert data.build_cache(source, 24, cache, verbose=False, rebuild=True) == folder and len(decoded) == 12


def test_a_cache_whose_targets_hold_a_pickled_object_is_damage_and_rebuilt(tmp_path, capsys, monkeypatch):
    source, cache = synthetic_train(tmp_path)
    monkeypatch.setattr(machinery.cache, "DecoderPool", InlinePool)
    folder = data.build_cache(source, 24, cache, verbose=False)
    targets = dict(np.load(os.path.join(folder, "targets.npz")))
    targets["local"] = np.array([object()] * 12)  # an object array: np.load would have to unpickle it
    np.savez(os.path.join(folder, "targets.npz"), **targets)
    with pytest.raises(data.DataError, match="damaged cache .*targets.npz"):
        data.XrayDataset(folder)
    assert data.build_cache(source, 24, cache, verbose=False) == folder
    assert "is damaged (targets.npz" in capsys.readouterr().out
    assert data.XrayDataset(folder).local.dtype == np.uint8


def test_a_new_cache_takes_its_disk_space_at_once_and_a_full_disk_is_one_line(tmp_path):
    # allocated when made, a full disk fails there, not with a SIGBUS at a later page's write; every file below is
    # unreadable, so no pixel is ever written and only the allocation can have taken the space
    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(b"not a png")
    write_rows(tmp_path / "set.csv", ["path", "Nodule", "split"], [[f"{k}.png", k % 2, "train"] for k in range(3)]
               + [["0.png", 0, "test"]])
    folder = data.build_cache(layouts.load_source(str(tmp_path / "set.csv"), "train"), 512, str(tmp_path / "cache"),
                              workers=1, verbose=False)
    st = os.stat(os.path.join(folder, "images.npy"))
    assert st.st_blocks * 512 >= st.st_size > 3 * 512 * 512
    # a file size limit stands in for a full disk (the same OSError at allocation): one line, then a rerun resumes
    script = ("import resource, signal, sys; sys.path.insert(0, '.'); signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)); import data; from machinery import layouts; "
              f"data.build_cache(layouts.load_source({str(tmp_path / 'set.csv')!r}, 'train'), 256, {str(tmp_path / 'c2')!r}, "
              "workers=1, verbose=False)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("machinery.layouts.DataError: cache: cannot write in") and "File too large" in last
    rerun = data.build_cache(layouts.load_source(str(tmp_path / "set.csv"), "train"), 256, str(tmp_path / "c2"), workers=1,
                             verbose=False)
    assert len(data.XrayDataset(rerun).image_ids) == 3


def test_interrupted_cache_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    source, cache = synthetic_train(tmp_path)
    calls = []
    real = machinery.cache._decode_one

    def failing_after_five(job):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(machinery.cache, "_decode_one", failing_after_five)
    monkeypatch.setattr(machinery.cache, "DecoderPool", InlinePool)
    with pytest.raises(KeyboardInterrupt):
        data.build_cache(source, 24, cache, verbose=False)
    folder = os.path.join(cache, os.listdir(cache)[0])
    assert not os.path.exists(os.path.join(folder, "meta.json")) and np.load(os.path.join(folder, "done.npy")).sum() == 5
    monkeypatch.setattr(machinery.cache, "_decode_one", real)
    data.build_cache(source, 24, cache, verbose=False)
    ds = data.XrayDataset(folder)
    assert len(ds) == 12
    for n in range(12):
        np.testing.assert_array_equal(ds.images[n], decode.resize_uint8(decode.read_dicom(source.paths[n]), 24))


def synthetic_train(tmp_path):
    root = str(synthetic.make_synthetic(str(tmp_path / "syn"), n_train=12, n_test=2, workers=1, verbose=False))
    return layouts.load_source(root, "train"), str(tmp_path / "cache")


def truncate(path, keep=1000):
    with open(path, "r+b") as f:
        f.truncate(keep)


@pytest.mark.parametrize("complete", [False, True])
def test_a_truncated_cache_is_said_and_rebuilt_never_read_as_black_images(tmp_path, capsys, complete, monkeypatch):
    source, cache = synthetic_train(tmp_path)
    monkeypatch.setattr(machinery.cache, "DecoderPool", InlinePool)
    folder = data.build_cache(source, 24, cache, verbose=False)
    if not complete:  # an unfinished build: its flags say done, its pixels were cut off
        os.remove(os.path.join(folder, "meta.json"))
        np.save(os.path.join(folder, "done.npy"), np.ones(12, bool))
    truncate(os.path.join(folder, "images.npy"))
    if complete:
        with pytest.raises(data.DataError, match=f"{folder}: damaged cache .*images.npy"):
            data.XrayDataset(folder)
    assert data.build_cache(source, 24, cache, verbose=False) == folder
    assert f"cache: {folder} is damaged (images.npy" in capsys.readouterr().out
    ds = data.XrayDataset(folder)
    assert len(ds) == 12 and all(ds.images[n].max() > 0 for n in range(12))
    np.testing.assert_array_equal(ds.images[11], decode.resize_uint8(decode.read_dicom(source.paths[11]), 24))


def test_another_process_waits_for_a_cache_it_does_not_build(tmp_path):
    source, cache = synthetic_train(tmp_path)
    with pytest.raises(runtime.NotReady):
        data.build_cache(source, 24, cache, verbose=False, create=False)
    folder = data.build_cache(source, 24, cache, workers=1, verbose=False)
    assert data.build_cache(source, 24, cache, verbose=False, create=False) == folder


class InlinePool:
    """Pool stand-in that runs jobs in this process, so a test can interrupt a build at a chosen image."""

    def __init__(self, workers=None, **_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs, chunksize=1):
        return map(fn, jobs)

    imap = imap_unordered
