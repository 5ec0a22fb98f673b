"""
Radiographs from files, as float32 images in [0, 1] that look as they should on screen (lungs dark, bone bright):

    read_image(path)     DICOM (by extension or content), or any image Pillow reads (PNG, JPEG, BMP, TIFF, WebP, GIF)
    read_dicom(path)     stored values -> modality LUT or rescale -> VOI LUT or window -> MONOCHROME1 inverted
    resize_uint8(x, S)   squashed to S x S and quantized, as the cache keeps every image

machinery/cache.py decodes each training and test image through these once; evaluate.py --images decodes a
user's own files through the same ones, so a model sees them exactly as it saw its training images.
"""

import os

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from machinery.layouts import DataError

MAX_PIXELS = 100_000_000  # 10,000 x 10,000: the largest image decoded (a chest radiograph is at most about 4,300 a side)
MAX_ASPECT = 4  # the longest side at most this many times the shortest: anything narrower is not a chest radiograph

# transfer syntaxes that pydicom cannot decode on its own, and what to install for them
PLUGIN_HINTS = {
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",  # JPEG 2000
}



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
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: a DICOM of {frames} frames; a radiograph has one")
    check_size(path, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))  # as claimed, before decoding anything
    try:
        pixels = ds.pixel_array
    except Exception as err:
        hint = f"; install a decoder: pip install {PLUGIN_HINTS[syntax]}" if syntax in PLUGIN_HINTS else ""
        raise DataError(f"{path}: cannot decode pixel data ({type(err).__name__}: {str(err).splitlines()[0]}){hint}") from None
    if ds.get("SamplesPerPixel", 1) == 3:  # a colour capture (a scanned film, a screenshot): display-ready, made grey
        grey = pixels.astype(np.float64) @ [0.299, 0.587, 0.114]  # (H, W, 3) -> (H, W), ITU-R BT.601 luma
        return np.clip(grey / (2 ** int(ds.get("BitsStored", 8)) - 1), 0, 1).astype(np.float32)
    image = finite(path, apply_modality_lut(pixels, ds).astype(np.float64))
    if "VOILUTSequence" in ds:
        image, bits = voi_lut(path, image, ds.VOILUTSequence[0])
        low, high = 0, 2 ** bits - 1  # a LUT's output spans 0 .. 2^bits - 1, as its descriptor declares
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


def voi_lut(path, image, item):
    """
    The first VOI LUT applied: output = LUTData[clip(value - first, 0, entries - 1)], by LUT Descriptor (entries,
    first stored value, bits per output; 0 entries means 65,536). Written out here because pydicom 3 casts the values
    to the LUT's own width first, so an 8-bit LUT over 12-bit values looks up each value modulo 256. Returns the
    looked-up image and the bits of its output.
    """
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
        if isinstance(data, bytes):  # OW: 16-bit words, or an 8-bit LUT packed into bytes
            data = np.frombuffer(data, np.uint8 if len(data) == (entries or 65536) else "<u2")
        table = np.asarray(data, np.float64).ravel()
    except Exception as err:
        raise DataError(f"{path}: its VOI LUT cannot be read ({type(err).__name__}: {err})") from None
    if not 1 <= bits <= 16 or len(table) != (entries or 65536):
        raise DataError(f"{path}: its VOI LUT holds {len(table)} entries of {bits} bits, its descriptor says {entries or 65536}")
    index = np.clip(np.rint(image) - first, 0, len(table) - 1).astype(np.int64)
    return table[index], bits


def check_size(path, rows, columns):
    """A DataError for an image too large to decode safely, or too narrow to be a chest radiograph, named by its size."""
    if rows * columns > MAX_PIXELS:
        raise DataError(f"{path}: {columns} x {rows} pixels ({rows * columns / 1e6:.0f} million; at most {MAX_PIXELS / 1e6:.0f} "
                        "million are decoded): not decoded")
    if min(rows, columns) * MAX_ASPECT < max(rows, columns):
        raise DataError(f"{path}: {columns} x {rows} pixels, an aspect of 1:{max(rows, columns) / max(min(rows, columns), 1):.0f}"
                        f" (at most 1:{MAX_ASPECT} is a radiograph): not used")


def finite(path, image):
    """image with its finite pixels kept; NaN (a masked region) and -inf read as the darkest value there is and +inf
    as the brightest. An image without one finite pixel is a DataError."""
    ok = np.isfinite(image)
    if ok.all():
        return image
    if not ok.any():
        raise DataError(f"{path}: no pixel is a finite number (all NaN or infinite)")
    low, high = image[ok].min(), image[ok].max()
    return np.where(ok, image, np.where(image == np.inf, high, low))


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
            check_size(path, im.height, im.width)  # from the header, before any pixel is decoded
            im = ImageOps.exif_transpose(im)  # a phone or scanner JPEG may be stored on its side
            if im.mode.startswith(("I", "F")):
                image = finite(path, np.asarray(im, np.float64))  # a float TIFF may hold NaN where it is masked
                image = ((image - image.min()) / max(float(image.max() - image.min()), 1e-6)).astype(np.float32)
            else:
                image = np.asarray(im.convert("L"), np.float32) / 255.0
    except DataError:
        raise
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
