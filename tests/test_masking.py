"""Tests for clinvla_jax.data.masking."""

import numpy as np
import pytest

from clinvla_jax import api
from clinvla_jax.data import masking
from clinvla_jax.data import schema
from clinvla_jax.data import records

K75 = records.num_kept_patches(0.75)


def _images(seed=0, views=schema.NUM_VIEWS):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (views, schema.IMAGE_SIZE, schema.IMAGE_SIZE), dtype=np.uint8)


def test_num_kept_at_75_percent():
  assert K75 == 49
  assert records.num_kept_patches(0.0) == schema.NUM_PATCHES


def test_patchify_shape_and_order():
  image = _images(views=1)[0]
  patches = masking.patchify(image)
  assert patches.shape == (196, 256) and patches.dtype == np.uint8
  p = schema.PATCH_SIZE
  for r, c in [(0, 0), (0, 13), (1, 0), (5, 7), (13, 13)]:
    block = image[r * p : (r + 1) * p, c * p : (c + 1) * p]
    np.testing.assert_array_equal(patches[r * 14 + c], block.reshape(-1))


def test_patchify_round_trip_with_leading_dims():
  images = _images(seed=3).reshape(2, 2, schema.IMAGE_SIZE, schema.IMAGE_SIZE)
  patches = masking.patchify(images)
  assert patches.shape == (2, 2, 196, 256)
  np.testing.assert_array_equal(masking.unpatchify(patches), images)


def test_patchify_rejects_bad_sizes():
  with pytest.raises(ValueError):
    masking.patchify(np.zeros((220, 224), np.uint8))
  with pytest.raises(ValueError):
    masking.unpatchify(np.zeros((195, 256), np.uint8))


def test_keep_indices_sorted_unique_exact_count():
  for index in range(20):
    for view in range(schema.NUM_VIEWS):
      idx = masking.keep_indices(K75, seed=7, epoch=0, index=index, view=view)
      assert idx.dtype == np.int32 and idx.shape == (K75,)
      assert np.all(np.diff(idx) > 0)
      assert idx[0] >= 0 and idx[-1] < schema.NUM_PATCHES


def test_keep_indices_reproducible_and_varying():
  kw = dict(seed=11, epoch=2, index=123, view=1)
  a = masking.keep_indices(K75, **kw)
  np.testing.assert_array_equal(a, masking.keep_indices(K75, **kw))
  for change in (dict(seed=12), dict(epoch=3), dict(index=124), dict(view=2)):
    b = masking.keep_indices(K75, **{**kw, **change})
    assert not np.array_equal(a, b), change


def test_keep_all_is_identity():
  idx = masking.keep_indices(schema.NUM_PATCHES, seed=0, epoch=5, index=9, view=3)
  np.testing.assert_array_equal(idx, np.arange(schema.NUM_PATCHES))
  images = _images(seed=4)
  patches, patch_idx = masking.mask_views(images, schema.NUM_PATCHES, seed=1, epoch=0, index=0)
  np.testing.assert_array_equal(patches, masking.patchify(images))
  np.testing.assert_array_equal(patch_idx, np.tile(np.arange(schema.NUM_PATCHES), (schema.NUM_VIEWS, 1)))


def test_keep_indices_uniform_over_patches():
  counts = np.zeros(schema.NUM_PATCHES)
  draws = 400
  for index in range(draws):
    counts[masking.keep_indices(K75, seed=0, epoch=0, index=index, view=0)] += 1
  freq = counts / draws
  # Each patch is kept with probability 49/196 = 0.25; the binomial standard
  # deviation over 400 draws is about 0.022, so 0.12 is more than 5 sigma.
  assert abs(freq.mean() - 0.25) < 1e-9
  assert np.all(np.abs(freq - 0.25) < 0.12)


def test_mask_views_matches_patchify_and_per_view_masks():
  images = _images(seed=5)
  patches, patch_idx = masking.mask_views(images, K75, seed=3, epoch=1, index=42)
  assert patches.shape == (schema.NUM_VIEWS, K75, 256)
  assert patches.dtype == np.uint8 and patch_idx.dtype == np.int32
  full = masking.patchify(images)
  for v in range(schema.NUM_VIEWS):
    expected = masking.keep_indices(K75, seed=3, epoch=1, index=42, view=v)
    np.testing.assert_array_equal(patch_idx[v], expected)
    np.testing.assert_array_equal(patches[v], full[v, expected])
  assert len({tuple(row) for row in patch_idx}) == schema.NUM_VIEWS


def test_negative_seed_parts_rejected():
  with pytest.raises(ValueError):
    masking.keep_indices(K75, seed=0, epoch=0, index=-1, view=0)
  with pytest.raises(ValueError):
    masking.keep_indices(0, seed=0, epoch=0, index=0, view=0)


def test_model_and_pipeline_share_the_patch_layout():
  rng = np.random.RandomState(0)
  gray = rng.randint(0, 256, size=(2, 3, 32, 48)).astype(np.uint8)
  patches, idx = api.patchify(gray, 16)
  np.testing.assert_array_equal(np.asarray(patches), masking.patchify(gray, 16))
  np.testing.assert_array_equal(np.asarray(idx), np.arange(6))
  rgb = rng.rand(2, 32, 48, 3).astype(np.float32)
  patches, _ = api.patchify(rgb, 16)
  assert patches.shape == (2, 6, 16 * 16 * 3)
  # Patch (row 1, col 2) of image 1: pixels [16:32, 32:48], (row, col, channel) order.
  np.testing.assert_array_equal(np.asarray(patches)[1, 1 * 3 + 2], rgb[1, 16:32, 32:48, :].reshape(-1))


def test_batch_masks_equal_per_view_masks():
  epochs = np.array([0, 0, 3, 7])
  indices = np.array([0, 5, 5, 123456])
  batch = masking.keep_indices_batch(K75, seed=9, epoch=epochs, index=indices)
  assert batch.shape == (4, schema.NUM_VIEWS, K75) and batch.dtype == np.int32
  for row, (e, i) in enumerate(zip(epochs, indices)):
    for view in range(schema.NUM_VIEWS):
      np.testing.assert_array_equal(batch[row, view], masking.keep_indices(K75, seed=9, epoch=e, index=i, view=view))
  # Fixed numbers: a change of the mask derivation shows up here.
  np.testing.assert_array_equal(masking.keep_indices(4, seed=0, epoch=0, index=0, view=0, num_patches=16), [0, 3, 4, 7])
