"""``--image_transform=alta`` / ``--dicom_scaling=alta``: records equal to what ALTA's evaluation scripts see.

The reference is torchvision itself: ``Resize(256, BICUBIC)``, ``CenterCrop(224)``,
``Grayscale(3)`` on the RGB image torchvision's loader makes of each file.
"""

import csv
import dataclasses
import glob
import os
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
import torchvision.transforms as T

from clinvla_jax.data import images
from clinvla_jax.data import records
from data_prep import chexpert
from clinvla_jax.data import studies as studies_lib
from clinvla_jax.data import writer
from data_prep import rsna_pneumonia

ALTA = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.Grayscale(3)])
RSNA_DICOM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
CONVERT = writer.Options(workers=0, progress=False, tfds=False, require_text=False)


def alta_reference(img: Image.Image) -> np.ndarray:
  """torchvision's output for one image, as 2-D uint8 (its three channels are equal)."""
  out = np.asarray(ALTA(img.convert("RGB")))
  assert out.shape == (224, 224, 3) and (out == out[..., :1]).all()
  return out[..., 0]


def _file_reference(path) -> np.ndarray:
  # torchvision's default_loader: PIL's open + convert("RGB").
  with Image.open(path) as img:
    return alta_reference(img)


def _real_rasters(shared_data):
  iu = sorted(glob.glob(str(shared_data / "iu_xray" / "images" / "**" / "*.png"), recursive=True))
  covid = sorted(glob.glob(str(shared_data / "covid_cxr_dev" / "images" / "*.jpg")))
  ratio = {}
  for f in covid:
    with Image.open(f) as img:
      ratio[f] = img.size[0] / img.size[1]
  # The tallest, widest and two square-ish covid images, beside every IU PNG and the NIH PNGs.
  by_ratio = sorted(covid, key=ratio.get)
  covid = [by_ratio[0], by_ratio[1], by_ratio[len(by_ratio) // 2], by_ratio[-2], by_ratio[-1]]
  nih = sorted(glob.glob(str(shared_data / "dicom" / "*.png")))
  return iu + covid + nih


def test_alta_resize_equals_torchvision_on_real_images(shared_data):
  files = _real_rasters(shared_data)
  sizes = set()
  for path in files:
    with Image.open(path) as img:
      sizes.add(img.size)
    np.testing.assert_array_equal(images.preprocess(path, transform="alta"), _file_reference(path), err_msg=path)
  assert len(files) >= 15 and any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_bicubic_on_gray_equals_bicubic_on_its_rgb_copy(shared_data):
  # ALTA resizes RGB copies of gray films; the gray path is the same to the pixel, so 'L' files skip the copy.
  for path in _real_rasters(shared_data)[:6]:
    with Image.open(path) as img:
      gray = img.convert("L")
    np.testing.assert_array_equal(images.alta_resize(np.asarray(gray)), alta_reference(gray), err_msg=path)
  # A colour file is not: gray after resizing (ALTA) differs from gray before, and preprocess follows ALTA.
  rng = np.random.default_rng(0)
  colour = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8), "RGB")
  assert (images.alta_resize(np.asarray(colour.convert("L"))) != alta_reference(colour)).sum() > 1000
  np.testing.assert_array_equal(images.alta_resize(colour), alta_reference(colour))


def test_centre_crop_and_resize_sizes_match_torchvision():
  rng = np.random.default_rng(1)
  # Odd margins (half-even rounding of the crop offset) and sizes where int() truncates the long side.
  for w, h in [(225, 500), (257, 259), (1000, 301), (300, 300), (256, 999), (479, 256)]:
    img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    np.testing.assert_array_equal(images.alta_resize(img), alta_reference(img), err_msg=f"{w}x{h}")


def test_alta_dicom_scaling_matches_convert_scale_abs(shared_data):
  # cv2.convertScaleAbs: saturate(round-half-even(|x * alpha|)), computed in float32.
  x = np.array([0, 1, 2, 3, 5, 7, 509, 510], np.uint16)
  np.testing.assert_array_equal(images.scale_abs_to_uint8(x, 0.5), [0, 0, 1, 2, 2, 4, 254, 255])
  np.testing.assert_array_equal(images.scale_abs_to_uint8(np.array([-3, -600], np.int16), 0.5), [2, 255])
  for name in ("RG1_UNCR.dcm", RSNA_DICOM):
    path = shared_data / "dicom" / name
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    expected = images.scale_abs_to_uint8(raw, 255.0 / raw.max())
    if ds.PhotometricInterpretation == "MONOCHROME1":
      expected = 255 - expected
    got = images.load_dicom(path, scaling="alta")
    np.testing.assert_array_equal(got, expected)
    # The brightest raw pixel maps to 255, or to 0 once MONOCHROME1 is inverted.
    assert (got.min() == 0) if ds.PhotometricInterpretation == "MONOCHROME1" else (got.max() == 255)
    # And the stored image is torchvision's transform of that 8-bit image.
    np.testing.assert_array_equal(
      images.preprocess(path, transform="alta", dicom_scaling="alta"), alta_reference(Image.fromarray(got))
    )
  # RG1_UNCR is MONOCHROME1 with a VOI window: the display scaling is a different image.
  path = shared_data / "dicom" / "RG1_UNCR.dcm"
  assert np.abs(images.load_dicom(path).astype(int) - images.load_dicom(path, scaling="alta")).mean() > 5


def test_options_refuse_pad_with_the_alta_crop():
  with pytest.raises(studies_lib.ConversionError, match="--pad applies to --image_transform=paper"):
    dataclasses.replace(CONVERT, pad=True, image_transform="alta").check()
  with pytest.raises(studies_lib.ConversionError, match="--image_transform='bicubic'"):
    dataclasses.replace(CONVERT, image_transform="bicubic").check()
  with pytest.raises(ValueError, match="pad applies to the paper transform"):
    images.preprocess("unused.png", pad=True, transform="alta")


def _frontals(out_dir):
  recs = {}
  for path in sorted(glob.glob(os.path.join(out_dir, "*.array_record"))):
    for data in writer.read_shard(path):
      rec = records.decode_record(data)
      recs[rec["image_ids"][0]] = rec["images"][0]
  return recs


def test_converters_store_alta_pixels(shared_data, tmp_path):
  # CheXpert list mode, with real covid JPEGs of several aspect ratios standing in at CheXpert paths.
  files = _real_rasters(shared_data)
  covid = [f for f in files if "covid_cxr_dev" in f]
  root = tmp_path / "chexpert"
  rows = []
  for i, src in enumerate(covid):
    rel = f"CheXpert-v1.0-small/valid/patient{i + 1:05d}/study1/view1_frontal.jpg"
    (root / rel).parent.mkdir(parents=True)
    shutil.copy(src, root / rel)
    rows.append({"Path": rel, **{name: "0.0" for name in chexpert.LABELS}, "Edema": "1.0"})
  with open(tmp_path / "list.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  opts = dataclasses.replace(CONVERT, image_transform="alta")
  writer.run(
    chexpert.plan_list(str(root / "CheXpert-v1.0-small"), str(tmp_path / "list.csv")), str(tmp_path / "c"), opts
  )
  stored = _frontals(tmp_path / "c")
  assert len(stored) == len(covid)
  for row, src in zip(rows, covid):
    np.testing.assert_array_equal(stored[row["Path"]], _file_reference(src), err_msg=src)
  assert writer.load_manifest(str(tmp_path / "c"))["options"]["image_transform"] == "alta"

  # RSNA: ALTA's DICOM scaling too.
  images_dir = tmp_path / "rsna" / "stage_2_train_images"
  images_dir.mkdir(parents=True)
  shutil.copy(shared_data / "dicom" / RSNA_DICOM, images_dir / "p1.dcm")
  (tmp_path / "rsna" / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\np1,,,,,0\n")
  opts = dataclasses.replace(CONVERT, image_transform="alta", dicom_scaling="alta")
  writer.run(rsna_pneumonia.build_plan(str(tmp_path / "rsna")), str(tmp_path / "r"), opts)
  alta_8bit = images.load_dicom(images_dir / "p1.dcm", scaling="alta")  # checked above against the formula
  np.testing.assert_array_equal(_frontals(tmp_path / "r")["p1"], alta_reference(Image.fromarray(alta_8bit)))
