"""Training augmentation of the image views, on the host, before masking: the peers' random affine and jitter.

ALTA trains with torchvision's ``RandomAffine(degrees=20, shear=10, translate=(0.1, 0.1), scale=(0.95, 1.05))``
(nearest-neighbour sampling, zero fill) followed by ``ColorJitter(brightness=(0.8, 1.2), contrast=(0.8, 1.2))``
on PIL images; `AugmentSpec`'s defaults are those values and this module follows the same arithmetic:

  * affine: the inverse matrix of ``torchvision.transforms.functional.affine`` about the image centre
    (112, 112), shear along x only, translations rounded to whole pixels; each output pixel centre is mapped
    into the source view and takes the pixel it lands in (0 outside the image), as PIL's NEAREST does.
  * jitter: brightness and contrast in a random order, each PIL's ``blend`` (``m + f * (p - m)`` in float32,
    truncated to uint8; m = 0 for brightness, the view's mean gray rounded for contrast).  The mean is taken over
    the view's kept pixels (all of them without masking); torchvision takes it over the whole image.

Only the kept patches are computed: a pixel's source index in the record's patch-major bytes is a sum of a
row term and a column term, so warping a view costs a few vector operations over its kept pixels and one
gather, never a full image.

Every draw is a hash of (seed, epoch, record index, view, parameter), like the masks (``masking.hash_keys``),
so a resumed run sees the same augmented batches.  With ``prior_follows_current`` (ALTA's choice) a prior view
takes its current counterpart's draw, so the two studies of a pair are transformed alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

from absl import logging
import numpy as np

from clinvla_jax.data import masking
from clinvla_jax.data import schema

# Separates the augmentation streams from the masks' under the same seed.
_AUGMENT_STREAM = 0x6175676D  # "augm"
PARAMETERS = ("angle", "translate_x", "translate_y", "scale", "shear", "brightness", "contrast", "brightness_first")
# View slot -> the slot whose draw it takes when priors follow their current views.
_PAIRED_SLOT = (0, 1, 0, 1)
_CENTRE = schema.IMAGE_SIZE / 2
_GRID = schema.IMAGE_SIZE // schema.PATCH_SIZE


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Ranges of the random affine and jitter (``config.data.augment``; defaults: ALTA's training transform).

  Attributes:
    degrees: rotation drawn uniformly in [-degrees, degrees].
    shear: shear along x, in degrees, drawn in [-shear, shear].
    translate: largest shift as a fraction of the image side, per axis; drawn, then rounded to whole pixels.
    scale: (low, high) of the zoom factor.
    brightness: (low, high) of the brightness factor.
    contrast: (low, high) of the contrast factor.
    prior_follows_current: a prior view takes its current counterpart's draw.
  """

  degrees: float = 20.0
  shear: float = 10.0
  translate: float = 0.1
  scale: tuple[float, float] = (0.95, 1.05)
  brightness: tuple[float, float] = (0.8, 1.2)
  contrast: tuple[float, float] = (0.8, 1.2)
  prior_follows_current: bool = True

  def __post_init__(self):
    for name in ("degrees", "shear"):
      if not 0 <= getattr(self, name) < 90:
        raise ValueError(f"data.augment.{name} = {getattr(self, name)!r}: must be in [0, 90)")
    if not 0 <= self.translate < 1:
      raise ValueError(f"data.augment.translate = {self.translate!r}: must be in [0, 1)")
    for name in ("scale", "brightness", "contrast"):
      low, high = getattr(self, name)
      if not 0 < low <= high:
        raise ValueError(f"data.augment.{name} = {getattr(self, name)!r}: must be (low, high) with 0 < low <= high")

  @classmethod
  def from_config(cls, augment_cfg: Any) -> Optional["AugmentSpec"]:
    """The spec of ``config.data.augment``, or None when it is absent or not ``enabled``."""
    if augment_cfg is None or not augment_cfg.get("enabled", False):
      return None
    fields = {f.name: augment_cfg[f.name] for f in dataclasses.fields(cls) if f.name in augment_cfg}
    for name in ("scale", "brightness", "contrast"):
      if name in fields:
        fields[name] = tuple(float(v) for v in fields[name])
    return cls(**fields)


def config_defaults() -> dict:
  """``config.data.augment`` of configs/base.py: enabled, with every range at its default."""
  return {"enabled": True, **dataclasses.asdict(AugmentSpec())}


def draw(spec: AugmentSpec, *, seed: int, epoch, index, num_views: int = schema.NUM_VIEWS) -> dict[str, np.ndarray]:
  """The parameters of every view of records: {name: [..., num_views]} for each of `PARAMETERS`.

  ``epoch`` and ``index`` broadcast together like `masking.keep_indices_batch`'s.  Translations are in whole
  pixels; ``brightness_first`` (bool) says which jitter comes first.
  """
  keys = masking.hash_keys(_AUGMENT_STREAM, seed=seed, epoch=epoch, index=index, rows=num_views, cols=len(PARAMETERS))
  if spec.prior_follows_current:
    keys = keys[..., list(_PAIRED_SLOT[:num_views]), :]
  u = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [..., V, P] uniform in [0, 1)

  def between(column: int, low: float, high: float) -> np.ndarray:
    return low + (high - low) * u[..., column]

  max_shift = spec.translate * schema.IMAGE_SIZE
  return {
    "angle": between(0, -spec.degrees, spec.degrees),
    "translate_x": np.round(between(1, -max_shift, max_shift)),
    "translate_y": np.round(between(2, -max_shift, max_shift)),
    "scale": between(3, *spec.scale),
    "shear": between(4, -spec.shear, spec.shear),
    "brightness": between(5, *spec.brightness),
    "contrast": between(6, *spec.contrast),
    "brightness_first": u[..., 7] < 0.5,
  }


def inverse_matrices(params: dict[str, np.ndarray]) -> np.ndarray:
  """float64 [..., 6]: (a, b, c, d, e, f) with source = (a x + b y + c, d x + e y + f) for output point (x, y).

  torchvision's inverse affine matrix (rotation, x shear, scale and translation about the image centre).
  """
  rot = np.radians(params["angle"])
  shear_x = np.radians(params["shear"])
  scale = params["scale"]
  tx, ty = params["translate_x"], params["translate_y"]
  # Rotation-shear matrix [[a, b], [c, d]] (no y shear), determinant 1.
  a = np.cos(rot)
  b = -np.cos(rot) * np.tan(shear_x) - np.sin(rot)
  c = np.sin(rot)
  d = -np.sin(rot) * np.tan(shear_x) + np.cos(rot)
  m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
  m2 = m0 * (-_CENTRE - tx) + m1 * (-_CENTRE - ty) + _CENTRE
  m5 = m3 * (-_CENTRE - tx) + m4 * (-_CENTRE - ty) + _CENTRE
  return np.stack([m0, m1, m2, m3, m4, m5], axis=-1)


# Within a patch, pixel p lies at column p % 16 and row p // 16; +0.5: PIL maps pixel centres.
_LOCAL_X = (np.arange(schema.PATCH_SIZE**2) % schema.PATCH_SIZE + 0.5).astype(np.float32)
_LOCAL_Y = (np.arange(schema.PATCH_SIZE**2) // schema.PATCH_SIZE + 0.5).astype(np.float32)
# Source coordinates are shifted by this before truncating to int, so truncation is floor for every coordinate
# the ranges above can reach (|coordinate| < 2 image sides); a multiple of 16, so the shift moves whole patches.
_SHIFT = 2 * schema.IMAGE_SIZE
_PATCH_PIXELS = schema.PATCH_SIZE**2
# Byte offset of source pixel (y, x) in patch-major rows, from the shifted coordinates Y = y + S, X = x + S:
#   (y >> 4) * 14 * 256 + (y & 15) * 16 + (x >> 4) * 256 + (x & 15)
#   = 16 Y + X + 3328 (Y >> 4) + 240 (X >> 4) - _SHIFT_OFFSET.
_ROW_STEP = _GRID * _PATCH_PIXELS - schema.PATCH_SIZE * schema.PATCH_SIZE  # 3328
_COL_STEP = _PATCH_PIXELS - schema.PATCH_SIZE  # 240
_SHIFT_OFFSET = 17 * _SHIFT + (_ROW_STEP + _COL_STEP) * (_SHIFT // schema.PATCH_SIZE)


def _source_terms(patch_idx: np.ndarray, matrices: np.ndarray):
  """float32 ([n, K], [n, K], [n, 256], [n, 256]): where n views' kept patches start and how far each pixel lies.

  The map is affine, so a pixel's source is its patch origin's source (the first two, shifted by ``_SHIFT``) plus
  its offset inside the patch (the last two); their sum is the pixel's shifted source coordinate.
  """
  m = matrices.astype(np.float32)
  origin_x = (patch_idx % _GRID * schema.PATCH_SIZE).astype(np.float32)  # [n, K]
  origin_y = (patch_idx // _GRID * schema.PATCH_SIZE).astype(np.float32)
  at_origin_x = m[:, 0, None] * origin_x + m[:, 1, None] * origin_y + (m[:, 2, None] + _SHIFT)
  at_origin_y = m[:, 3, None] * origin_x + m[:, 4, None] * origin_y + (m[:, 5, None] + _SHIFT)
  within_x = m[:, 0, None] * _LOCAL_X + m[:, 1, None] * _LOCAL_Y  # [n, 256]
  within_y = m[:, 3, None] * _LOCAL_X + m[:, 4, None] * _LOCAL_Y
  return at_origin_x, at_origin_y, within_x, within_y


def _view_base(view_start) -> np.ndarray:
  """int32 [n]: what turns a view's shifted-coordinate offset into a byte offset in the rows (see `_SHIFT_OFFSET`)."""
  return np.asarray(view_start, np.int32) * _PATCH_PIXELS - _SHIFT_OFFSET


def warp_kept(rows: np.ndarray, view_start: np.ndarray, patch_idx: np.ndarray, matrices: np.ndarray):
  """(uint8 [n, K, 256] source pixels, bool [n, K, 256] inside): the kept patches of n affine-warped views.

  A pixel whose source lies outside the image is ``inside`` False (its byte is arbitrary; `jitter` zeroes it,
  torchvision's fill, before the jitter sees it).

  Args:
    rows: uint8 [R, 256] patch rows holding the source views (a record's ``BatchParts.rows``).
    view_start: int [n] first row of each view in ``rows`` (196 rows a view).
    patch_idx: int [n, K] kept patch of the output views.
    matrices: float [n, 6] `inverse_matrices`.
  """
  at_origin_x, at_origin_y, within_x, within_y = _source_terms(patch_idx, matrices)
  src_x = (at_origin_x[:, :, None] + within_x[:, None, :]).astype(np.int32)  # shifted: X = x + S
  src_y = (at_origin_y[:, :, None] + within_y[:, None, :]).astype(np.int32)
  inside = np.maximum((src_x - _SHIFT).view(np.uint32), (src_y - _SHIFT).view(np.uint32)) < schema.IMAGE_SIZE
  offset = src_y << 4
  offset += src_x
  offset += (src_y >> 4) * _ROW_STEP
  offset += (src_x >> 4) * _COL_STEP
  offset += _view_base(view_start)[:, None, None]
  return np.take(rows.reshape(-1), offset, mode="clip"), inside


def _blend(pixels: np.ndarray, factor: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """PIL's ``Image.blend`` of a solid ``centre`` image and ``pixels`` (float32): c + f (p - c), clipped."""
  centre = centre.astype(np.float32)[:, None]
  out = pixels - centre
  out *= factor.astype(np.float32)[:, None]
  out += centre
  np.maximum(out, 0, out=out)
  return np.minimum(out, 255, out=out)


def jitter(pixels: np.ndarray, brightness: np.ndarray, contrast: np.ndarray, brightness_first: np.ndarray, inside=None):
  """uint8 [n, ...]: brightness and contrast of n views, in each view's own order; 0 where not ``inside``."""
  shape = pixels.shape
  n = shape[0]
  flat = pixels.reshape(n, -1)
  p = flat.astype(np.float32) if inside is None else np.multiply(flat, inside.reshape(n, -1), dtype=np.float32)
  zero = np.zeros(n)
  for stage in range(2):
    use_brightness = brightness_first if stage == 0 else ~brightness_first
    # Whole gray values below 2^24 sum exactly in float32.
    mean_gray = np.floor(p.sum(axis=1) / p.shape[1] + 0.5)
    p = _blend(p, np.where(use_brightness, brightness, contrast), np.where(use_brightness, zero, mean_gray))
    if stage == 0:
      np.trunc(p, out=p)  # PIL stores each step as uint8; the cast below truncates the last
  return p.astype(np.uint8).reshape(shape)


def augment_kept(
  rows: np.ndarray, view_start: np.ndarray, patch_idx: np.ndarray, params: dict[str, np.ndarray], matrices=None
) -> np.ndarray:
  """uint8 [n, K, 256]: `warp_kept`, then `jitter`, for n views with their drawn ``params`` ([n] each).

  ``matrices``: the views' `inverse_matrices` when already computed.
  """
  matrices = inverse_matrices(params) if matrices is None else matrices
  warped, inside = warp_kept(rows, view_start, patch_idx, matrices)
  return jitter(warped, params["brightness"], params["contrast"], params["brightness_first"], inside)


# The smallest number of views and of patch rows the compiled kernels are traced for; larger inputs are padded to
# the next power of two, so a pipeline compiles a handful of shapes once.
_MIN_VIEWS = 8
_MIN_ROWS = _MIN_VIEWS * schema.NUM_PATCHES
_kernels = None  # (put on the host CPU, warp, jitter) once built; False: jax cannot run on the CPU here
_reference_only = False  # set by `numpy_reference`


@contextlib.contextmanager
def numpy_reference():
  """Within it, `augment_kept_compiled` computes with the numpy reference `augment_kept` (this process only).

  For measuring the two on the same loader (benchmarks/pipeline.py, mode ``train_augment_numpy``).
  """
  global _reference_only
  previous, _reference_only = _reference_only, True
  try:
    yield
  finally:
    _reference_only = previous


def _bucket(size: int, smallest: int) -> int:
  return max(smallest, 1 << (max(size, 1) - 1).bit_length())


def padded_rows(num_rows: int) -> int:
  """How many patch rows `augment_kept_compiled` runs on for ``num_rows``: rows of that length are not copied."""
  return _bucket(num_rows, _MIN_ROWS)


def _split_factor(factor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float32 (high, low), high + low = factor exactly: high keeps 15 significant bits, low the other 9.

  Times a difference of two grays (|d| <= 255, 8 bits) both products are exact in float32, so their rounded sum
  is float32's d * factor, however XLA fuses the multiplies.
  """
  factor = np.asarray(factor, np.float32)
  high = (factor.view(np.uint32) & np.uint32(0xFFFFFE00)).view(np.float32)
  return high, factor - high


def _compiled_kernels():
  """(put on the host CPU, warp, jitter), or None where jax cannot run on the CPU here (said once, in the log)."""
  global _kernels
  if _kernels is None:
    try:
      _kernels = _build_kernels()
    except Exception as e:  # pylint: disable=broad-exception-caught
      logging.warning("augmentation: jax cannot run on the CPU here (%r); using the numpy implementation", e)
      _kernels = False
  return _kernels or None


def _build_kernels():
  """`warp_kept` and `jitter`'s arithmetic as two XLA computations on the host CPU, traced once per shape.

  Two computations, not one: fused together, XLA recomputes the gather inside each of the jitter's reductions,
  which made the whole about 3x slower than the two parts.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def warp(flat_rows, base, at_origin_x, at_origin_y, within_x, within_y):
    src_x = (at_origin_x[:, :, None] + within_x[:, None, :]).astype(jnp.int32)
    src_y = (at_origin_y[:, :, None] + within_y[:, None, :]).astype(jnp.int32)
    unsigned = lambda v: jax.lax.bitcast_convert_type(v - _SHIFT, jnp.uint32)  # noqa: E731
    inside = (unsigned(src_x) < schema.IMAGE_SIZE) & (unsigned(src_y) < schema.IMAGE_SIZE)
    offset = (src_y << 4) + src_x + (src_y >> 4) * _ROW_STEP + (src_x >> 4) * _COL_STEP + base[:, None, None]
    return jnp.where(inside, jnp.take(flat_rows, offset, mode="clip"), jnp.uint8(0))

  def jitter_views(pixels, factors_high, factors_low, contrast_first):
    count = pixels.shape[1] * pixels.shape[2]
    p = pixels.reshape(pixels.shape[0], -1).astype(jnp.int32)
    for stage in range(2):
      use_contrast = contrast_first if stage == 0 else ~contrast_first
      # The rounded mean gray in integers: for every sum of whole grays of 256 k pixels (k = 1..196) it equals
      # `jitter`'s float32 floor(sum / count + 0.5) (tests/test_augment.py checks it exhaustively).
      centre = jnp.where(use_contrast, (2 * p.sum(axis=1) + count) // (2 * count), 0)[:, None]
      difference = (p - centre).astype(jnp.float32)
      # factor * difference as two exact products (see `_split_factor`) and one rounded sum: XLA fuses a multiply
      # and the add after it into one FMA, whose single rounding would differ from PIL's two in the last bit.
      product = difference * factors_high[:, stage, None] + difference * factors_low[:, stage, None]
      p = jnp.clip(product + centre.astype(jnp.float32), 0, 255).astype(jnp.int32)  # truncated, as PIL stores
    return p.astype(jnp.uint8).reshape(pixels.shape)

  # Local: under jax.distributed the global list starts with process 0's devices.
  cpu = jax.local_devices(backend="cpu")[0]
  return (lambda *arrays: jax.device_put(arrays, cpu), jax.jit(warp), jax.jit(jitter_views))


def augment_kept_compiled(
  rows: np.ndarray, view_start: np.ndarray, patch_idx: np.ndarray, params: dict[str, np.ndarray], matrices=None
) -> np.ndarray:
  """`augment_kept`, bit for bit, computed by XLA on the host CPU: 2-3x faster on a chunk of 32 studies' views.

  Inputs are padded (views to a power of two >= 8, rows to a power of two >= 8 views' worth), so a stream of
  chunks compiles a few shapes.  ``rows`` whose length is already such a power of two are used without a copy.
  The computation always runs on the CPU, whatever jax's default backend is; where jax has no CPU backend
  (``JAX_PLATFORMS`` without ``cpu``) it falls back to `augment_kept`.
  """
  kernels = None if _reference_only else _compiled_kernels()
  if kernels is None:
    return augment_kept(rows, view_start, patch_idx, params, matrices)
  to_cpu, warp, jitter_views = kernels
  matrices = inverse_matrices(params) if matrices is None else matrices
  n, k = patch_idx.shape
  views, num_rows = _bucket(n, _MIN_VIEWS), padded_rows(rows.shape[0])
  if num_rows != rows.shape[0]:
    padded = np.zeros((num_rows, _PATCH_PIXELS), np.uint8)
    padded[: rows.shape[0]] = rows.reshape(rows.shape[0], -1)
    rows = padded

  def pad(values, dtype=None):
    values = np.asarray(values, dtype)
    return np.concatenate([values, np.zeros((views - n, *values.shape[1:]), values.dtype)]) if views > n else values

  terms = [pad(t, np.float32) for t in _source_terms(patch_idx, matrices)]
  brightness_first = np.asarray(params["brightness_first"], bool)
  brightness, contrast = (np.asarray(params[name], np.float32) for name in ("brightness", "contrast"))
  factors = np.stack(
    [np.where(brightness_first, brightness, contrast), np.where(brightness_first, contrast, brightness)], 1
  )
  high, low = _split_factor(factors)  # [n, 2]: each stage's factor
  *warp_args, high, low, contrast_first = to_cpu(  # one transfer call for every input
    rows.reshape(-1), pad(_view_base(view_start), np.int32), *terms, pad(high), pad(low), pad(~brightness_first)
  )
  jittered = jitter_views(warp(*warp_args), high, low, contrast_first)
  return np.asarray(jittered)[:n]


def augment_image(image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
  """uint8 [224, 224]: one whole view augmented with scalar ``params`` (figures, tests)."""
  rows = masking.patchify(np.asarray(image, np.uint8))
  one = {k: np.asarray(v).reshape(1) for k, v in params.items()}
  kept = augment_kept(rows, np.zeros(1, np.int32), np.arange(schema.NUM_PATCHES, dtype=np.int32)[None], one)
  return masking.unpatchify(kept[0])


def describe(spec: Optional[AugmentSpec]) -> str:
  if spec is None:
    return "no augmentation"
  return (
    f"affine (rotation +-{spec.degrees:g} deg, x shear +-{spec.shear:g} deg, shift +-{spec.translate:g}, "
    f"scale {spec.scale[0]:g}-{spec.scale[1]:g}), brightness {spec.brightness[0]:g}-{spec.brightness[1]:g}, "
    f"contrast {spec.contrast[0]:g}-{spec.contrast[1]:g}"
  )
