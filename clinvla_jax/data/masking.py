"""Patchify and MAE-style random masking of the image views, on the host.

An image of ``IMAGE_SIZE x IMAGE_SIZE`` pixels is cut into a 14x14 grid of 16x16
patches.  Patch ``r * 14 + c`` (row-major) covers rows ``16r..16r+15`` and columns
``16c..16c+15``; its pixels are flattened in (row, col, channel) order, which for
grayscale is plain row-major order.  This is the order a 16x16 stride-16
convolution kernel of shape (16, 16, 1, D) sees when reshaped to (256, D).

Masking keeps ``K`` patches per view, chosen uniformly without replacement:
each patch gets a 64-bit key, a hash of (seed, epoch, record index, view, patch),
and the ``K`` patches with the smallest keys are kept.  The keys depend on
nothing else, so any masked batch can be rebuilt later from its record indices,
and a whole batch is masked by one vectorised hash, partition and sort (one
seeded generator per view cost about 40 µs, more than reading the study).
Kept indices are sorted ascending, so keeping all 196 patches is the identity.
"""

from __future__ import annotations

import numpy as np

from clinvla_jax.data import schema

# Separates the masking streams from any other use of the same seed.
_MASK_STREAM = 0x6D61736B  # "mask"


def patchify(images, patch_size: int = schema.PATCH_SIZE, channels_last: bool = False):
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


def unpatchify(
  patches: np.ndarray, image_size: int = schema.IMAGE_SIZE, patch_size: int = schema.PATCH_SIZE
) -> np.ndarray:
  """Inverse of ``patchify`` for square images: [..., N, p*p] -> [..., H, W]."""
  patches = np.asarray(patches)
  g = image_size // patch_size
  *lead, n, d = patches.shape
  if n != g * g or d != patch_size * patch_size:
    raise ValueError(f"expected [..., {g * g}, {patch_size**2}] patches, got {patches.shape}")
  x = patches.reshape(*lead, g, g, patch_size, patch_size)
  x = np.swapaxes(x, -3, -2)  # [..., g, p, g, p]
  return x.reshape(*lead, image_size, image_size)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _check_non_negative(**values):
  for name, value in values.items():
    if np.any(np.asarray(value) < 0):
      raise ValueError(f"{name} must be non-negative, got {value}")


def hash_keys(stream: int, *, seed: int, epoch, index, rows: int, cols: int) -> np.ndarray:
  """uint64 [..., rows, cols] keys of records: a hash of (stream, seed, epoch, record index, row, column).

  The one source of randomness of the pipeline: the masks (`patch_keys`, rows = views, columns = patches) and
  the augmentation draws (``augment.draw``) differ only in their ``stream``.  ``epoch`` and ``index`` are ints or
  int arrays (broadcast together); the result has their broadcast shape plus (rows, cols).
  """
  _check_non_negative(seed=seed, epoch=epoch, index=index)
  epoch = np.asarray(epoch, np.int64).astype(np.uint64)
  index = np.asarray(index, np.int64).astype(np.uint64)
  with np.errstate(over="ignore"):
    h = _mix(np.full((), stream, np.uint64) ^ np.uint64(seed))
    h = _mix((h + epoch * _GOLDEN) ^ np.uint64(1))
    h = _mix(h ^ (index * _GOLDEN))[..., None, None]
    row = np.arange(1, rows + 1, dtype=np.uint64)[:, None]
    col = np.arange(1, cols + 1, dtype=np.uint64)
    return _mix(_mix(h ^ (row * _GOLDEN)) + col * _GOLDEN)


def patch_keys(
  *, seed: int, epoch, index, num_views: int = schema.NUM_VIEWS, num_patches: int = schema.NUM_PATCHES
) -> np.ndarray:
  """uint64 [..., num_views, num_patches] masking keys of records (`hash_keys` of the mask stream).

  Args:
    seed: experiment seed.
    epoch: int or int array (broadcast with ``index``).
    index: int or int array of global record indices.
    num_views: views per record.
    num_patches: patches per view.

  Returns:
    One key per (record, view, patch); shape ``broadcast(epoch, index).shape +
    (num_views, num_patches)``.
  """
  return hash_keys(_MASK_STREAM, seed=seed, epoch=epoch, index=index, rows=num_views, cols=num_patches)


def keep_indices_batch(
  num_kept: int, *, seed: int, epoch, index, num_views: int = schema.NUM_VIEWS, num_patches: int = schema.NUM_PATCHES
) -> np.ndarray:
  """Sorted kept patch indices, int32 [..., num_views, num_kept], of records.

  ``epoch`` and ``index`` are ints or arrays (broadcast together); row ``r``,
  view ``v`` equals ``keep_indices(num_kept, seed=seed, epoch=epoch[r],
  index=index[r], view=v)``.
  """
  if not 0 < num_kept <= num_patches:
    raise ValueError(f"num_kept must be in [1, {num_patches}], got {num_kept}")
  shape = np.broadcast(np.asarray(epoch), np.asarray(index)).shape
  if num_kept == num_patches:
    _check_non_negative(seed=seed, epoch=epoch, index=index)
    return np.broadcast_to(np.arange(num_patches, dtype=np.int32), shape + (num_views, num_patches)).copy()
  keys = patch_keys(seed=seed, epoch=epoch, index=index, num_views=num_views, num_patches=num_patches)
  # The top 32 bits partition about 1.7x faster than all 64; a tie (odds about
  # 1e-5 per view) still resolves the same way every time.
  keys = (keys >> np.uint64(32)).astype(np.uint32)
  kept = np.argpartition(keys, num_kept - 1, axis=-1)[..., :num_kept]
  kept.sort(axis=-1)
  return kept.astype(np.int32)


def keep_indices(
  num_kept: int, *, seed: int, epoch: int, index: int, view: int, num_patches: int = schema.NUM_PATCHES
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
    patch is kept.
  """
  _check_non_negative(view=view)
  return keep_indices_batch(
    num_kept, seed=seed, epoch=int(epoch), index=int(index), num_views=int(view) + 1, num_patches=num_patches
  )[int(view)]


def gather_patches(views: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Kept patches of row-major images: [V, H, W] and [V, K] -> [V, K, p*p]."""
  num_views, h, w = views.shape
  p = schema.PATCH_SIZE
  gh, gw = h // p, w // p
  num_kept = idx.shape[-1]
  if num_kept == gh * gw:
    return patchify(views)
  # Gathering the kept patches straight from the image grid copies a quarter
  # of the pixels; patchifying everything first would copy all of them.
  grid = views.reshape(num_views, gh, p, gw, p)
  rows, cols = np.divmod(idx, gw)
  kept = grid[np.arange(num_views)[:, None], rows, :, cols, :]  # [V, K, p, p]
  return kept.reshape(num_views, num_kept, p * p)


def mask_views(
  images: np.ndarray, num_kept: int, *, seed: int, epoch: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
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
  p = schema.PATCH_SIZE
  idx = keep_indices_batch(
    num_kept, seed=seed, epoch=epoch, index=index, num_views=num_views, num_patches=(h // p) * (w // p)
  )
  return gather_patches(images, idx), idx
