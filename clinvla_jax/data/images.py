"""Loading chest X-rays from PNG/JPEG/DICOM into 8-bit grayscale at model size.

All loaders return a 2-D ``uint8`` array where higher means brighter on a
conventional film display (bone bright, lungs dark).  Errors are raised as
``ImageError`` naming the file and what is wrong, so converters can write them to
``rejects.csv`` verbatim.

Two ways to bring an image to model size (``preprocess(..., transform=)``):
"paper" (the default) stretches it bilinearly to 224 x 224 (or, with ``pad``,
fits it on a black square); "alta" is the evaluation transform of the ALTA
release, torchvision's ``Resize(256, BICUBIC)`` (shorter side to 256) then
``CenterCrop(224)`` then ``Grayscale``, reproduced pixel for pixel with PIL so
that records equal what ALTA's scripts feed their model.

The paper windows with "width 1500 HU, level -500 HU".  Projection radiographs
have no Hounsfield scale, so that window cannot be applied literally; we use the
window / VOI LUT the acquiring device stored in the DICOM (the radiologist's
display setting) and fall back to the full pixel range when there is none.
"""

import os
from typing import Union

import numpy as np
from PIL import Image

from clinvla_jax.data import schema

PathLike = Union[str, os.PathLike]

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
# preprocess(transform=...): see the module docstring.
IMAGE_TRANSFORMS = ("paper", "alta")
# load_dicom(scaling=...): "display" applies the DICOM's modality and VOI LUTs;
# "alta" is ALTA's RSNA loader (raw pixel_array scaled by 255 / max).
DICOM_SCALINGS = ("display", "alta")
# ALTA's evaluation resize (shorter side) for a 224 crop.
ALTA_RESIZE = 256


class ImageError(ValueError):
  """An image file cannot be read or is not a usable radiograph."""

  def __init__(self, path: PathLike, problem: str):
    super().__init__(f"{os.fspath(path)}: {problem}")
    self.path = os.fspath(path)
    self.problem = problem


def is_dicom(path: PathLike) -> bool:
  """Whether ``path`` is a DICOM file: by its extension, else by the Part 10 "DICM" marker."""
  if os.fspath(path).lower().endswith(DICOM_EXTENSIONS):
    return True
  # DICOM Part 10 files carry "DICM" after a 128-byte preamble whatever their name.
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def rescale_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
  """Linearly maps [lo, hi] (default: the data range) to [0, 255]."""
  arr = np.asarray(arr, np.float64)
  lo = float(np.min(arr)) if lo is None else lo
  hi = float(np.max(arr)) if hi is None else hi
  if hi <= lo:
    return np.zeros(arr.shape, np.uint8)
  out = (arr - lo) * (255.0 / (hi - lo))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pil_to_gray(img: Image.Image, path: PathLike) -> np.ndarray:
  """Converts any PIL image to 2-D uint8, keeping 16-bit precision until the end."""
  mode = img.mode
  if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    arr = np.asarray(img)
    if arr.ndim != 2:
      raise ImageError(path, f"unexpected {mode} array shape {arr.shape}")
    # 16-bit PNGs often use only 10-12 bits; stretch the used range rather than
    # dividing by 256, which would leave a nearly black image.
    return rescale_to_uint8(arr)
  if mode in ("RGBA", "LA", "PA"):
    img = img.convert("RGBA" if mode == "RGBA" else "LA")
    bg = Image.new(img.mode, img.size)  # transparent pixels become black
    img = Image.alpha_composite(bg.convert("RGBA"), img.convert("RGBA"))
  if mode == "L":
    return np.asarray(img, np.uint8)
  if mode == "1":
    return np.asarray(img.convert("L"), np.uint8)
  # RGB exports of grayscale films (e.g. Open-I PNGs) are exactly gray; for true
  # colour images (annotated figures) ITU-R 601 luma is a reasonable gray.
  return np.asarray(img.convert("RGB").convert("L"), np.uint8)


def load_raster(path: PathLike) -> np.ndarray:
  """Reads a PNG/JPEG/other PIL-readable image as 2-D uint8."""
  try:
    with Image.open(path) as img:
      img.load()  # decode now: truncated files fail here, not later
      arr = _pil_to_gray(img, path)
  except ImageError:
    raise
  except FileNotFoundError as e:
    raise ImageError(path, "file not found") from e
  except Image.UnidentifiedImageError as e:
    raise ImageError(path, "not a recognised image format (corrupt or not an image)") from e
  except (OSError, SyntaxError, ValueError) as e:
    # PIL reports truncation and bad chunks as OSError/SyntaxError.
    raise ImageError(path, f"cannot decode image ({e})") from e
  return arr


def scale_abs_to_uint8(pixels: np.ndarray, alpha: float) -> np.ndarray:
  """OpenCV's ``convertScaleAbs(pixels, alpha=alpha)`` in numpy: saturate(round-half-even(|x * alpha|)).

  OpenCV computes in float32 for integer and float32 inputs, so this does too:
  the product rounds exactly as there before the half-even rounding.
  """
  scaled = np.abs(np.asarray(pixels).astype(np.float32) * np.float32(alpha))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def alta_dicom_scaling(pixels: np.ndarray, photometric: str) -> np.ndarray:
  """ALTA's RSNA loader on a DICOM ``pixel_array``: x * 255 / max(x) to uint8, MONOCHROME1 inverted.

  No modality or VOI LUT is applied, as there.
  """
  peak = float(np.max(pixels))
  if peak <= 0:
    return np.zeros(np.shape(pixels), np.uint8)
  out = scale_abs_to_uint8(pixels, 255.0 / peak)
  return 255 - out if photometric == "MONOCHROME1" else out


def load_dicom(path: PathLike, scaling: str = "display") -> np.ndarray:
  """Reads a DICOM radiograph as 2-D uint8 with display conventions applied.

  Order (``scaling="display"``): modality LUT (rescale slope/intercept), VOI
  LUT or window when the file has one, then MONOCHROME1 inversion so that bone
  is bright.  ``scaling="alta"``: `alta_dicom_scaling` of the raw pixels.
  """
  if scaling not in DICOM_SCALINGS:
    raise ValueError(f"DICOM scaling {scaling!r}: use one of {DICOM_SCALINGS}")
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pylint: disable=g-import-not-at-top

  try:
    ds = pydicom.dcmread(path)
  except FileNotFoundError as e:
    raise ImageError(path, "file not found") from e
  except Exception as e:  # pydicom raises several unrelated types here
    raise ImageError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from e
  if "PixelData" not in ds:
    raise ImageError(path, "DICOM has no pixel data")
  try:
    pixels = ds.pixel_array
  except Exception as e:  # missing codec, truncated pixel data, ...
    raise ImageError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  if pixels.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
    pixels = pixels.astype(np.float64).mean(-1)
  elif pixels.ndim != 2:
    raise ImageError(path, f"expected one 2-D frame, got pixel array of shape {pixels.shape}")
  if scaling == "alta":
    return alta_dicom_scaling(pixels, photometric)
  arr = apply_modality_lut(pixels, ds).astype(np.float64)
  has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
  if has_voi:
    try:
      arr = np.asarray(apply_voi_lut(arr, ds, index=0), np.float64)
    except Exception as e:
      raise ImageError(path, f"invalid VOI LUT / window ({e})") from e
  out = rescale_to_uint8(arr)
  if photometric == "MONOCHROME1":
    out = 255 - out
  return out


def load_image(path: PathLike, dicom_scaling: str = "display") -> np.ndarray:
  """Reads any supported radiograph file as 2-D uint8 (bone bright); DICOMs scaled by ``dicom_scaling``."""
  if not os.path.exists(path):
    raise ImageError(path, "file not found")
  if os.path.getsize(path) == 0:
    raise ImageError(path, "file is empty")
  arr = load_dicom(path, dicom_scaling) if is_dicom(path) else load_raster(path)
  if min(arr.shape) < 16:
    raise ImageError(path, f"image too small ({arr.shape[1]}x{arr.shape[0]})")
  return arr


def resize(arr: np.ndarray, size: int = schema.IMAGE_SIZE, pad: bool = False) -> np.ndarray:
  """Bilinear resize of a 2-D uint8 image to ``size x size``.

  Args:
    arr: 2-D uint8 image.
    size: output side.
    pad: if True, keep the aspect ratio (longer side -> ``size``) and centre the
      image on a black square; otherwise stretch (the paper's choice).
  """
  img = Image.fromarray(np.asarray(arr, np.uint8), mode="L")
  if not pad:
    return np.asarray(img.resize((size, size), Image.BILINEAR), np.uint8)
  w, h = img.size
  scale = size / max(w, h)
  nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
  canvas = np.zeros((size, size), np.uint8)
  top, left = (size - nh) // 2, (size - nw) // 2
  canvas[top : top + nh, left : left + nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR))
  return canvas


def alta_resize(
  img: np.ndarray | Image.Image, size: int = schema.IMAGE_SIZE, resize_to: int = ALTA_RESIZE
) -> np.ndarray:
  """torchvision's ``Resize(resize_to, BICUBIC)``, ``CenterCrop(size)``, ``Grayscale`` on a PIL image, as 2-D uint8.

  Args:
    img: 2-D uint8 array, or a PIL image (e.g. RGB, as torchvision's image
      loader gives it: colour is resampled before it becomes gray).
    size: output side (the crop).
    resize_to: the shorter side after resizing; the longer becomes
      ``int(resize_to * long / short)``, as torchvision computes it.
  """
  if not isinstance(img, Image.Image):
    img = Image.fromarray(np.asarray(img, np.uint8), mode="L")
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = resize_to, int(resize_to * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.BICUBIC)
  if min(new_w, new_h) < size:
    raise ValueError(f"alta_resize: a {size} crop does not fit {new_w}x{new_h} (resize_to {resize_to})")
  # torchvision's CenterCrop: Python's round() of the half margin.
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  img = img.crop((left, top, left + size, top + size))
  return np.asarray(img if img.mode == "L" else img.convert("L"), np.uint8)


def _alta_input(path: PathLike, gray: np.ndarray) -> np.ndarray | Image.Image:
  """What ALTA's transform starts from: the RGB image torchvision's loader makes of an 8-bit raster file.

  DICOMs and high-bit rasters keep our 8-bit gray (``gray``): torchvision's
  loader has no DICOM path and would clip 16-bit values.
  """
  if is_dicom(path):
    return gray
  with Image.open(path) as img:
    if img.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
      return gray
    img.load()
    return img.convert("RGB")


def preprocess(
  path: PathLike,
  size: int = schema.IMAGE_SIZE,
  pad: bool = False,
  transform: str = "paper",
  dicom_scaling: str = "display",
) -> np.ndarray:
  """``load_image`` then ``resize`` ("paper") or `alta_resize` ("alta"): what the converters store per view.

  Args:
    path: the image file.
    size: output side.
    pad: "paper" only: keep the aspect ratio and pad (see `resize`).
    transform: one of `IMAGE_TRANSFORMS`.
    dicom_scaling: one of `DICOM_SCALINGS`.
  """
  if transform not in IMAGE_TRANSFORMS:
    raise ValueError(f"image transform {transform!r}: use one of {IMAGE_TRANSFORMS}")
  if pad and transform != "paper":
    raise ValueError("pad applies to the paper transform; the alta transform crops")
  arr = load_image(path, dicom_scaling)
  if arr.std() < 1.0:
    raise ImageError(path, "image is blank (constant intensity)")
  if transform == "alta":
    return alta_resize(_alta_input(path, arr), size)
  return resize(arr, size, pad)


def frontal_score(arr: np.ndarray) -> float:
  """Content cue for frontal vs lateral: > 0 looks frontal, < 0 looks lateral.

  On a frontal film the spine and mediastinum form a bright column in the middle
  with dark lungs on both sides; on a lateral film the middle of the chest is
  lung and the spine lies near one edge.  We compare the mean of the central
  columns with the two lung-field bands, over the thoracic rows.  Measured on
  real IU X-ray images: frontals 0.16-0.28, laterals -0.02-0.10 (threshold 0.13).
  """
  small = np.asarray(Image.fromarray(np.asarray(arr, np.uint8)).resize((128, 128), Image.BILINEAR), np.float32) / 255.0
  profile = small[24:96].mean(0)
  centre = profile[58:70].mean()
  lungs = 0.5 * (profile[24:44].mean() + profile[84:104].mean())
  return float(centre - lungs - 0.13)
