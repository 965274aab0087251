"""Patchify and MAE-style random masking of the image views, on the host.

An image of ``IMAGE_SIZE x IMAGE_SIZE`` pixels is cut into a 14x14 grid of 16x16
patches.  Patch ``r * 14 + c`` (row-major) covers rows ``16r..16r+15`` and columns
``16c..16c+15``; its pixels are flattened in (row, col, channel) order, which for
grayscale is plain row-major order.  This is the order a 16x16 stride-16
convolution kernel of shape (16, 16, 1, D) sees when reshaped to (256, D).

Masking keeps ``K`` patches per view, chosen uniformly without replacement by a
generator seeded from (seed, epoch, record index, view) alone, so any masked
batch can be rebuilt later from its record indices.  Kept indices are sorted
ascending, so keeping all 196 patches is the identity.
"""

from __future__ import annotations

import numpy as np

from clinvla_jax.data import records

# Separates the masking streams from any other use of the same seed.
_MASK_STREAM = 0x6D61736B  # "mask"


def patchify(images, patch_size: int = records.PATCH_SIZE, channels_last: bool = False):
  """Cuts images into flattened patches: the one patch layout of the pipeline and the model.

  Args:
    images: [..., H, W] (or [..., H, W, C] with ``channels_last``) pixels of
      any dtype, a numpy or a JAX array (the result is of the same kind); H and
      W multiples of ``patch_size``.
    patch_size: side of a square patch.
    channels_last: whether the last axis holds channels.

  Returns:
    [..., (H // p) * (W // p), p * p * C] patches, row-major patch index, pixels
    in (row, col, channel) order.  A copy, same dtype.
  """
  if not hasattr(images, "swapaxes"):
    images = np.asarray(images)
  if channels_last:
    *lead, h, w, c = images.shape
  else:
    *lead, h, w = images.shape
    c = 1
  if h % patch_size or w % patch_size:
    raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch_size}")
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(*lead, gh, patch_size, gw, patch_size, c)
  x = x.swapaxes(-4, -3)  # [..., gh, gw, p, p, c]
  return x.reshape(*lead, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: np.ndarray, image_size: int = records.IMAGE_SIZE,
               patch_size: int = records.PATCH_SIZE) -> np.ndarray:
  """Inverse of ``patchify`` for square images: [..., N, p*p] -> [..., H, W]."""
  patches = np.asarray(patches)
  g = image_size // patch_size
  *lead, n, d = patches.shape
  if n != g * g or d != patch_size * patch_size:
    raise ValueError(
        f"expected [..., {g * g}, {patch_size ** 2}] patches, got {patches.shape}")
  x = patches.reshape(*lead, g, g, patch_size, patch_size)
  x = np.swapaxes(x, -3, -2)  # [..., g, p, g, p]
  return x.reshape(*lead, image_size, image_size)


def mask_rng(*, seed: int, epoch: int, index: int, view: int
             ) -> np.random.Generator:
  """The generator that draws the mask of one view of one record in one epoch."""
  for name, value in (("seed", seed), ("epoch", epoch), ("index", index),
                      ("view", view)):
    if int(value) < 0:
      raise ValueError(f"{name} must be non-negative, got {value}")
  entropy = [_MASK_STREAM, int(seed), int(epoch), int(index), int(view)]
  return np.random.Generator(np.random.Philox(np.random.SeedSequence(entropy)))


def keep_indices(num_kept: int, *, seed: int, epoch: int, index: int,
                 view: int, num_patches: int = records.NUM_PATCHES
                 ) -> np.ndarray:
  """Sorted indices of the ``num_kept`` patches one view keeps.

  Args:
    num_kept: patches to keep, in [1, num_patches].
    seed: experiment seed.
    epoch: pass over the data; each epoch draws new masks.
    index: global record index in its source.
    view: view number in [0, NUM_VIEWS).
    num_patches: patches per view.

  Returns:
    int32 [num_kept], strictly increasing; ``arange(num_patches)`` when every
    patch is kept (no random draw then).
  """
  if not 0 < num_kept <= num_patches:
    raise ValueError(f"num_kept must be in [1, {num_patches}], got {num_kept}")
  if num_kept == num_patches:
    return np.arange(num_patches, dtype=np.int32)
  rng = mask_rng(seed=seed, epoch=epoch, index=index, view=view)
  kept = rng.permutation(num_patches)[:num_kept]
  return np.sort(kept).astype(np.int32)


def mask_views(images: np.ndarray, num_kept: int, *, seed: int, epoch: int,
               index: int) -> tuple[np.ndarray, np.ndarray]:
  """Patchifies every view of one study and keeps ``num_kept`` patches of each.

  Each view draws its own mask (``keep_indices`` with its view number), also
  views that are missing: shapes stay fixed and the model ignores them.

  Args:
    images: [V, H, W] views of one study.
    num_kept: patches kept per view.
    seed: experiment seed.
    epoch: pass over the data.
    index: global record index.

  Returns:
    patches [V, num_kept, p*p] (dtype of ``images``) and patch_idx
    int32 [V, num_kept].
  """
  images = np.asarray(images)
  num_views, h, w = images.shape
  p = records.PATCH_SIZE
  gh, gw = h // p, w // p
  if num_kept == gh * gw:
    return patchify(images), np.broadcast_to(
        np.arange(gh * gw, dtype=np.int32), (num_views, gh * gw)).copy()
  idx = np.stack([
      keep_indices(num_kept, seed=seed, epoch=epoch, index=index, view=v,
                   num_patches=gh * gw)
      for v in range(num_views)
  ])
  # Gathering the kept patches straight from the image grid copies a quarter
  # of the pixels; patchifying everything first would copy all of them.
  grid = images.reshape(num_views, gh, p, gw, p)
  rows, cols = np.divmod(idx, gw)
  kept = grid[np.arange(num_views)[:, None], rows, :, cols, :]  # [V, K, p, p]
  return kept.reshape(num_views, num_kept, p * p), idx
