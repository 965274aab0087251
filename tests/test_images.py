"""Tests for image loading and preprocessing (clinvla_jax.data.images)."""

import numpy as np
from PIL import Image
import pytest

from clinvla_jax.data import images


def test_monochrome1_dicom_is_inverted(shared_data):
  arr = images.load_image(shared_data / "dicom" / "RG1_UNCR.dcm")
  assert arr.dtype == np.uint8 and arr.shape == (1955, 1841)
  small = images.resize(arr)
  # Lung fields (either side of the spine, mid-height) are darker than the
  # spine/mediastinum column after MONOCHROME1 inversion.
  lungs = np.concatenate([small[70:150, 40:85], small[70:150, 140:185]]).mean()
  spine = small[70:150, 100:124].mean()
  assert spine > lungs + 10, (spine, lungs)


def test_rsna_dicom_and_png(shared_data):
  dcm = images.preprocess(shared_data / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
  png = images.preprocess(shared_data / "dicom" / "00000001_000.png")
  for arr in (dcm, png):
    assert arr.shape == (224, 224) and arr.dtype == np.uint8 and arr.std() > 20
    assert arr[70:150, 100:124].mean() > arr[70:150, 40:85].mean()


def test_16bit_png_and_rgb(tmp_path):
  ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 3  # 12-bit range
  Image.fromarray(ramp).save(tmp_path / "a.png")
  arr = images.load_image(tmp_path / "a.png")
  assert arr.dtype == np.uint8 and arr.min() == 0 and arr.max() == 255
  rgb = np.stack([np.full((32, 32), 100, np.uint8)] * 3, -1)
  Image.fromarray(rgb).save(tmp_path / "b.jpg")
  assert abs(int(images.load_image(tmp_path / "b.jpg").mean()) - 100) <= 2


def test_resize_and_pad():
  arr = np.full((100, 50), 200, np.uint8)
  out = images.resize(arr, 224, pad=True)
  assert out.shape == (224, 224)
  assert out[:, :50].max() == 0 and out[:, 56:168].min() == 200
  assert images.resize(arr, 224).min() == 200


@pytest.mark.parametrize(
  "make,msg",
  [
    (lambda p: p.write_bytes(b""), "file is empty"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100), "cannot decode|not a recognised"),
    (lambda p: p.write_bytes(b"hello world" * 20), "not a recognised image"),
    (lambda p: None, "file not found"),
  ],
)
def test_bad_files_name_the_file(tmp_path, make, msg):
  path = tmp_path / "bad.png"
  make(path)
  with pytest.raises(images.ImageError, match=msg) as e:
    images.load_image(path)
  assert str(path) in str(e.value)


def test_truncated_and_unreadable(shared_data, tmp_path):
  data = (shared_data / "dicom" / "00000001_000.png").read_bytes()
  (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
  with pytest.raises(images.ImageError, match="t.png: cannot decode"):
    images.load_image(tmp_path / "t.png")
  dcm = (shared_data / "dicom" / "RG1_UNCR.dcm").read_bytes()
  (tmp_path / "t.dcm").write_bytes(dcm[:4000])
  with pytest.raises(images.ImageError, match="t.dcm"):
    images.load_image(tmp_path / "t.dcm")
  (tmp_path / "x.dcm").write_bytes(b"not dicom" * 100)
  with pytest.raises(images.ImageError, match="unreadable DICOM|pixel"):
    images.load_image(tmp_path / "x.dcm")


def test_blank_image_rejected(tmp_path):
  Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "z.png")
  with pytest.raises(images.ImageError, match="blank"):
    images.preprocess(tmp_path / "z.png")
