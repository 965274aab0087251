"""Training augmentation (clinvla_jax.data.augment): torchvision's arithmetic, draws from the seed, the pipeline."""

import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import flags
import ml_collections
import numpy as np
from PIL import Image
import pytest
import torchvision.transforms.functional as TF

from clinvla_jax.config import ConfigError, validate
from clinvla_jax.data import DEMO_DIR
from clinvla_jax.data import augment
from clinvla_jax.data import masking
from clinvla_jax.data import pipeline
from clinvla_jax.data import records
from clinvla_jax.data import schema
from clinvla_jax.data import source as source_lib
from configs import base

DEMO = str(DEMO_DIR / "covid_cxr")
REPO = pathlib.Path(__file__).resolve().parents[1]
ALTA = augment.AugmentSpec()


def setup_module():
  # Grain reads absl flags; pytest does not parse them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


@pytest.fixture(scope="module")
def demo_views():
  """Real current frontal views of the bundled demo set, uint8 [8, 224, 224]."""
  src = source_lib.ArrayRecordSource(source_lib.list_shards(DEMO))
  return np.stack([records.decode_record(src[i])["images"][0] for i in range(8)])


def _one(params, row, view=0):
  return {k: v[row, view] for k, v in params.items()}


def _torchvision(image, p):
  """ALTA's transform with the drawn parameters: torchvision's affine and jitter on a PIL image."""
  out = TF.affine(
    Image.fromarray(image),
    angle=float(p["angle"]),
    translate=[int(p["translate_x"]), int(p["translate_y"])],
    scale=float(p["scale"]),
    shear=[float(p["shear"]), 0.0],
    interpolation=TF.InterpolationMode.NEAREST,
    fill=0,
  )
  steps = [
    lambda x: TF.adjust_brightness(x, float(p["brightness"])),
    lambda x: TF.adjust_contrast(x, float(p["contrast"])),
  ]
  for step in steps if p["brightness_first"] else steps[::-1]:
    out = step(out)
  return np.asarray(out)


def test_whole_views_match_torchvision_on_pil(demo_views):
  params = augment.draw(ALTA, seed=0, epoch=0, index=np.arange(len(demo_views)))
  for i, image in enumerate(demo_views):
    ours = augment.augment_image(image, _one(params, i))
    want = _torchvision(image, _one(params, i))
    assert ours.shape == (224, 224) and ours.dtype == np.uint8
    # PIL's nearest-neighbour affine runs in 16.16 fixed point: a pixel whose source lies within ~1e-5 of a
    # pixel edge may land in the neighbour.  A wrong matrix (sign, centre, order) agrees on far fewer.
    assert (ours == want).mean() > 0.998, (i, (ours == want).mean())
    assert not np.array_equal(ours, image)


def test_jitter_equals_torchvision_exactly(demo_views):
  rng = np.random.default_rng(0)
  for image in demo_views:
    b, c = rng.uniform(0.8, 1.2, 2)
    for brightness_first in (True, False):
      p = dict(angle=0.0, translate_x=0.0, translate_y=0.0, scale=1.0, shear=0.0)
      p.update(brightness=b, contrast=c, brightness_first=brightness_first)
      np.testing.assert_array_equal(augment.augment_image(image, p), _torchvision(image, p))


def test_kept_patches_equal_the_whole_view_warped():
  rng = np.random.default_rng(1)
  views = rng.integers(0, 256, (3, 224, 224), dtype=np.uint8)
  rows = masking.patchify(views).reshape(-1, 256)
  params = augment.draw(ALTA, seed=5, epoch=2, index=np.arange(3))
  params = {k: v[:, 0] for k, v in params.items()}
  kept = masking.keep_indices_batch(49, seed=5, epoch=2, index=np.arange(3))[:, 0]
  starts = np.arange(3, dtype=np.int32) * schema.NUM_PATCHES
  got, got_inside = augment.warp_kept(rows, starts, kept, augment.inverse_matrices(params))
  whole, inside = augment.warp_kept(rows, starts, np.tile(np.arange(196), (3, 1)), augment.inverse_matrices(params))
  assert 0.5 < inside.mean() < 1  # some pixels come from outside the image
  np.testing.assert_array_equal(got_inside, np.take_along_axis(inside, kept[:, :, None], axis=1))
  np.testing.assert_array_equal(got * got_inside, np.take_along_axis(whole * inside, kept[:, :, None], axis=1))


def test_draws_are_reproducible_in_range_and_priors_follow_their_current_view():
  index = np.arange(500)
  a = augment.draw(ALTA, seed=1, epoch=3, index=index)
  b = augment.draw(ALTA, seed=1, epoch=3, index=index)
  for name in augment.PARAMETERS:
    np.testing.assert_array_equal(a[name], b[name])
    assert a[name].shape == (500, schema.NUM_VIEWS)
  other_epoch = augment.draw(ALTA, seed=1, epoch=4, index=index)
  other_seed = augment.draw(ALTA, seed=2, epoch=3, index=index)
  assert (a["angle"] != other_epoch["angle"]).all() and (a["angle"] != other_seed["angle"]).all()
  assert np.abs(a["angle"]).max() <= 20 and np.abs(a["angle"]).max() > 19
  assert np.abs(a["shear"]).max() <= 10
  shifts = np.concatenate([a["translate_x"], a["translate_y"]])
  assert (shifts == np.round(shifts)).all() and np.abs(shifts).max() == 22  # round(0.1 * 224 = 22.4)
  for name, (low, high) in (("scale", ALTA.scale), ("brightness", ALTA.brightness), ("contrast", ALTA.contrast)):
    assert low <= a[name].min() and a[name].max() <= high, name
  assert 0.4 < a["brightness_first"].mean() < 0.6
  # ALTA: a prior view takes its current counterpart's transform (slots: current frontal, current lateral, prior
  # frontal, prior lateral); the two current views draw apart.
  for name in augment.PARAMETERS:
    np.testing.assert_array_equal(a[name][:, 2], a[name][:, 0])
    np.testing.assert_array_equal(a[name][:, 3], a[name][:, 1])
  assert (a["angle"][:, 0] != a["angle"][:, 1]).all()
  apart = augment.draw(dataclasses.replace(ALTA, prior_follows_current=False), seed=1, epoch=3, index=index)
  assert (apart["angle"][:, 2] != apart["angle"][:, 0]).all()


def _loader(augment_spec, **kwargs):
  args = dict(global_batch_size=8, seed=3, shard_index=0, shard_count=1, augment=augment_spec)
  return pipeline.make_train_loader(DEMO, **{**args, **kwargs})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_disabled_gives_the_unaugmented_batches_bitwise():
  cfg = ml_collections.ConfigDict(augment.config_defaults())
  cfg.enabled = False
  assert augment.AugmentSpec.from_config(cfg) is None and augment.AugmentSpec.from_config(None) is None
  plain = _take(iter(pipeline.make_train_loader(DEMO, global_batch_size=8, seed=3, shard_index=0, shard_count=1)), 3)
  disabled = _take(iter(_loader(augment.AugmentSpec.from_config(cfg))), 3)
  for x, y in zip(plain, disabled):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_augmented_rows_are_the_drawn_transform_of_their_study():
  spec = augment.AugmentSpec.from_config(ml_collections.ConfigDict(augment.config_defaults()))
  src = source_lib.ArrayRecordSource(source_lib.list_shards(DEMO))
  batch = next(iter(_loader(spec)))
  plain = next(iter(_loader(None)))
  np.testing.assert_array_equal(batch["record_index"], plain["record_index"])
  np.testing.assert_array_equal(batch["patch_idx"], plain["patch_idx"])  # the masks do not move
  assert batch["patches"].dtype == np.uint8 and batch["patches"].shape == plain["patches"].shape
  params = augment.draw(spec, seed=3, epoch=0, index=batch["record_index"])
  for row, index in enumerate(batch["record_index"]):
    study = records.decode_record(src[int(index)])
    for view in range(schema.NUM_VIEWS):
      got = batch["patches"][row, view]
      if not study["view_valid"][view]:
        assert not batch["view_valid"][row, view] and not got.any()
        continue
      kept = batch["patch_idx"][row, view]
      p = {k: np.asarray(v[row, view]).reshape(1) for k, v in params.items()}
      want = augment.augment_kept(masking.patchify(study["images"][view]), np.zeros(1, np.int32), kept[None], p)[0]
      np.testing.assert_array_equal(got, want)
      assert not np.array_equal(got, plain["patches"][row, view])


def test_augmented_batches_resume_exactly():
  loader = _loader(ALTA)
  it = iter(loader)
  reference = _take(it, 4)
  it = loader.iterator()
  next(it)
  state = it.get_state()
  resumed = _take(loader.iterator(state), 3)
  for x, y in zip(reference[1:], resumed):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  # Another seed draws anew: the same studies are transformed otherwise.
  assert not np.array_equal(reference[0]["patches"], _take(iter(_loader(ALTA, seed=4)), 1)[0]["patches"])


def test_config_has_altas_ranges_and_refuses_bad_ones():
  cfg = base.get_config()
  assert augment.AugmentSpec.from_config(cfg.data.augment) == ALTA
  assert (ALTA.degrees, ALTA.shear, ALTA.translate, ALTA.scale) == (20.0, 10.0, 0.1, (0.95, 1.05))
  assert (ALTA.brightness, ALTA.contrast) == ((0.8, 1.2), (0.8, 1.2))
  for field, value, message in (
    ("degrees", 95.0, "data.augment.degrees = 95.0: must be in [0, 90)"),
    ("scale", (1.1, 0.9), "data.augment.scale = (1.1, 0.9): must be (low, high) with 0 < low <= high"),
    ("translate", 1.5, "data.augment.translate = 1.5: must be in [0, 1)"),
  ):
    bad = base.get_config()
    bad.data.augment[field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
      validate(bad)


def check_compiled_equals_reference(demo_views):
  """The pipeline's XLA kernel against `augment_kept`: real and random views, odd view and row counts, 300 draws."""
  rng = np.random.default_rng(0)
  real = np.concatenate([masking.patchify(v) for v in demo_views])  # 8 views' rows
  noise = rng.integers(0, 256, (5 * schema.NUM_PATCHES, schema.PATCH_SIZE**2), dtype=np.uint8)
  for rows, n, k in ((real, 300, 49), (noise, 37, 49), (real, 3, schema.NUM_PATCHES), (noise[:196], 1, 98)):
    params = augment.draw(ALTA, seed=n, epoch=0, index=np.arange(n))
    params = {name: values[:, 0] for name, values in params.items()}
    starts = rng.integers(0, rows.shape[0] // schema.NUM_PATCHES, n).astype(np.int32) * schema.NUM_PATCHES
    kept = np.stack([rng.permutation(schema.NUM_PATCHES)[:k] for _ in range(n)]).astype(np.int32)
    want = augment.augment_kept(rows, starts, kept, params)
    got = augment.augment_kept_compiled(rows, starts, kept, params)
    assert got.shape == (n, k, schema.PATCH_SIZE**2) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def check_compiled_rounds_twice():
  """Grays where one rounding of (p - c) f + c (an FMA) truncates otherwise than PIL's two: the kernel keeps two."""
  rng = np.random.default_rng(0)
  p, c = rng.integers(0, 256, (2, 400_000)).astype(np.float32)
  f = rng.uniform(0.8, 1.2, 400_000).astype(np.float32)
  two_roundings = np.trunc(np.clip((p - c) * f + c, 0, 255))
  one_rounding = np.trunc(np.clip(((p - c).astype(np.float64) * f + c).astype(np.float32), 0, 255))
  mirror = 2 * c - p
  traps = np.flatnonzero((two_roundings != one_rounding) & (mirror >= 0) & (mirror <= 255))[:8]
  assert traps.size >= 2, "no trap found: search more values"
  # One kept patch per view: gray p, its mirror 2c - p (so the mean is exactly c), the rest c; identity affine.
  n = traps.size
  pixels = np.repeat(c[traps, None], schema.PATCH_SIZE**2, axis=1)
  pixels[:, 0], pixels[:, 1] = p[traps], 2 * c[traps] - p[traps]
  rows = np.zeros((n * schema.NUM_PATCHES, schema.PATCH_SIZE**2), np.uint8)
  rows[:: schema.NUM_PATCHES] = pixels
  params = {name: np.zeros(n) for name in ("angle", "translate_x", "translate_y", "shear")}
  params.update(scale=np.ones(n), brightness=np.ones(n), contrast=f[traps].astype(np.float64))
  params["brightness_first"] = np.zeros(n, bool)  # contrast, then brightness 1 (exact)
  starts = np.arange(n, dtype=np.int32) * schema.NUM_PATCHES
  kept = np.zeros((n, 1), np.int32)
  want = augment.augment_kept(rows, starts, kept, params)
  np.testing.assert_array_equal(want[:, 0, 0], two_roundings[traps])  # the reference is PIL's arithmetic here
  np.testing.assert_array_equal(augment.augment_kept_compiled(rows, starts, kept, params), want)


def test_the_compiled_kernel_equals_the_numpy_reference_bitwise(demo_views):
  check_compiled_equals_reference(demo_views)
  check_compiled_rounds_twice()


def test_the_fully_optimised_kernel_equals_the_numpy_reference_bitwise(demo_views):
  """The same checks where XLA runs every optimisation, as training does (this suite turns LLVM's off).

  Optimised, XLA fuses a multiply and the add after it into one FMA; the jitter must not let it (see
  `augment._build_kernels`), and only an optimised compile can show that it does not.
  """
  views = os.path.join(tempfile.mkdtemp(), "views.npy")
  np.save(views, demo_views)
  code = (
    "import sys, numpy as np; sys.path.insert(0, 'tests'); import test_augment as t; "
    f"t.check_compiled_equals_reference(np.load({views!r})); t.check_compiled_rounds_twice(); print('ok')"
  )
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="0", JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_augmented_batches_from_a_worker_process_equal_in_process_ones():
  """A Grain worker runs the compiled kernel in its own process (on the CPU) and gives the same batches."""
  in_process = _take(iter(_loader(ALTA)), 2)
  from_worker = _take(iter(_loader(ALTA, worker_count=1)), 2)
  for x, y in zip(in_process, from_worker):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_the_integer_mean_gray_equals_the_float32_one_for_every_sum():
  """The compiled jitter's rounded mean, (2 s + n) // (2 n), against `jitter`'s float32 floor(s / n + 0.5)."""
  for patches in (1, 49, 98, 196):
    count = patches * schema.PATCH_SIZE**2
    sums = np.arange(255 * count + 1, dtype=np.int64)
    as_float32 = np.floor(sums.astype(np.float32) / count + 0.5)
    assert as_float32.dtype == np.float32
    np.testing.assert_array_equal((2 * sums + count) // (2 * count), as_float32)


def test_numpy_reference_switch_bypasses_the_compiled_kernels(monkeypatch, demo_views):
  def refuse():
    raise AssertionError("the compiled kernels were used inside numpy_reference()")

  monkeypatch.setattr(augment, "_compiled_kernels", refuse)
  rows = masking.patchify(demo_views[0])
  params = {name: values[:3, 0] for name, values in augment.draw(ALTA, seed=1, epoch=0, index=np.arange(3)).items()}
  kept = np.tile(np.arange(49, dtype=np.int32), (3, 1))
  with augment.numpy_reference():
    got = augment.augment_kept_compiled(rows, np.zeros(3, np.int32), kept, params)
  np.testing.assert_array_equal(got, augment.augment_kept(rows, np.zeros(3, np.int32), kept, params))
  with pytest.raises(AssertionError, match="compiled kernels were used"):
    augment.augment_kept_compiled(rows, np.zeros(3, np.int32), kept, params)
