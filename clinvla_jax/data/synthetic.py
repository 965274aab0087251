"""A planted-signal study set: each image carries a textured block in one lung zone, its report names the zone.

What it is for: convergence tests that need a task the model can provably
learn in a few hundred CPU steps, with no real data.  Retrieval on it is at
chance for an untrained model and near perfect once image and text towers
agree on which zone holds the block, so "training works" becomes a measurable
claim.

Layout.  The 224 x 224 image is the 14 x 14 grid of 16-pixel patches of
``masking.py``.  The lung field is the central 12 x 12 patches (a one-patch
border of plain background), cut into ``GRID x GRID`` = 4 x 4 zones of 3 x 3
patches (48 x 48 pixels).  The block fills its zone's nine patches.  The
background is dark Gaussian noise.

Two cues name the zone, one per loss:
* where the block is (which patches), which GLoRIA's word-region attention can
  use;
* what the block looks like: a fixed +-1 texture of one patch, its own for each
  zone, tiled over the block, plus noise.  A frozen random ViT's [CLS] is close
  to the mean of its patch embeddings, which keeps no position, so a pure
  "where" signal is invisible to the global embedding; the texture survives
  that mean (a linear probe on random 2-layer features decodes the zone from it
  at > 90 % with 49 of 196 patches kept), so the global loss has a signal to
  learn too.

Words.  Zone (row r, column c) is named by three single WordPiece tokens of
the bundled uncased vocabulary: a row word (apical / upper / lower / basal), a
side (right / left) and a depth (lateral / medial).  Columns follow the
radiological convention that the patient's right is on the image's left:
image columns 0..3 read "right lateral", "right medial", "left medial", "left
lateral".  The rest of the report is drawn from a few templates whose words
say nothing about the zone, so only the zone words carry the signal.

Views.  With ``views="all"`` (the default) the four record views (current
frontal / lateral, prior frontal / lateral) are all valid and each carries the
study's block, with its own noise: under 75 % masking a view keeps 49 of 196
patches and can miss all nine block patches (about 7 % of views), and four
independently masked views make a study whose every view misses it rare.
``views="frontal"`` keeps only the current frontal (the evaluation protocols'
setting); the other views are zeros and marked invalid.

Everything is a pure function of its arguments and an explicit numpy
Generator (or seed), so a test can rebuild any batch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from clinvla_jax.data import masking
from clinvla_jax.data import schema

GRID = 4
NUM_ZONES = GRID * GRID
ZONE_PATCHES = 3  # patches per zone side
FIELD_OFFSET = 1  # patches of plain border around the lung field
BACKGROUND_MEAN, BACKGROUND_STD = 40.0, 12.0
BLOCK_MEAN, BLOCK_CONTRAST, BLOCK_STD = 140.0, 80.0, 12.0  # block pixel = mean +- contrast + noise
TEXTURE_SEED = 7

ROW_WORDS = ("apical", "upper", "lower", "basal")
COLUMN_WORDS = ("right lateral", "right medial", "left medial", "left lateral")
# Zone-free wording around the zone name: the model must read the zone words.
TEMPLATES = (
  "bright opacity in the {zone} zone.",
  "there is a focal opacity in the {zone} zone.",
  "dense consolidation projecting over the {zone} zone. no pneumothorax.",
  "findings: new opacity, {zone} zone.",
)

VIEW_MODES = ("all", "frontal")


def zone_name(zone: int) -> str:
  """ "upper right medial" for zone 5 (row 1, image column 1)."""
  if not 0 <= zone < NUM_ZONES:
    raise ValueError(f"zone must be in [0, {NUM_ZONES}), got {zone}")
  row, col = divmod(int(zone), GRID)
  return f"{ROW_WORDS[row]} {COLUMN_WORDS[col]}"


def zone_texture(zone: int) -> np.ndarray:
  """The fixed +-1 [16, 16] texture of one zone (the same in every study)."""
  p = schema.PATCH_SIZE
  return np.random.default_rng([TEXTURE_SEED, int(zone)]).choice(np.array([-1.0, 1.0]), (p, p))


def draw_image(zone: int, rng: np.random.Generator) -> np.ndarray:
  """One uint8 [224, 224] view: dark noise with the zone's textured block over its nine patches."""
  size, p = schema.IMAGE_SIZE, schema.PATCH_SIZE
  image = rng.normal(BACKGROUND_MEAN, BACKGROUND_STD, (size, size))
  row, col = divmod(int(zone), GRID)
  zone_px = ZONE_PATCHES * p
  y0 = (FIELD_OFFSET + row * ZONE_PATCHES) * p
  x0 = (FIELD_OFFSET + col * ZONE_PATCHES) * p
  texture = np.tile(zone_texture(zone), (ZONE_PATCHES, ZONE_PATCHES))
  image[y0 : y0 + zone_px, x0 : x0 + zone_px] = (
    BLOCK_MEAN + BLOCK_CONTRAST * texture + rng.normal(0.0, BLOCK_STD, (zone_px, zone_px))
  )
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def report(zone: int, rng: np.random.Generator) -> str:
  template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
  return template.format(zone=zone_name(zone))


@dataclasses.dataclass(frozen=True)
class Studies:
  """N synthetic studies in the record layout.

  Attributes:
    images: uint8 [N, 4, 224, 224]; zeros where a view is missing.
    view_valid: bool [N, 4].
    zones: int32 [N], the planted zone of each study.
    texts: the N reports.
  """

  images: np.ndarray
  view_valid: np.ndarray
  zones: np.ndarray
  texts: tuple

  def __len__(self) -> int:
    return len(self.zones)


def make_studies(zones: Sequence[int], rng: np.random.Generator, views: str = "all") -> Studies:
  """One study per entry of ``zones`` (see the module docstring for ``views``)."""
  if views not in VIEW_MODES:
    raise ValueError(f"views must be one of {VIEW_MODES}, got {views!r}")
  zones = np.asarray(zones, np.int32).reshape(-1)
  n = len(zones)
  size = schema.IMAGE_SIZE
  images = np.zeros((n, schema.NUM_VIEWS, size, size), np.uint8)
  view_valid = np.zeros((n, schema.NUM_VIEWS), bool)
  used = schema.NUM_VIEWS if views == "all" else 1
  texts = []
  for i, zone in enumerate(zones):
    for v in range(used):
      images[i, v] = draw_image(zone, rng)
    view_valid[i, :used] = True
    texts.append(report(zone, rng))
  return Studies(images=images, view_valid=view_valid, zones=zones, texts=tuple(texts))


def distinct_zones(num: int, rng: np.random.Generator) -> np.ndarray:
  """``num`` different zones in random order (a batch without false negatives)."""
  if not 0 < num <= NUM_ZONES:
    raise ValueError(f"at most {NUM_ZONES} distinct zones, asked for {num}")
  return rng.permutation(NUM_ZONES)[:num].astype(np.int32)


def to_batch(
  studies: Studies,
  tokenizer,
  num_kept: int = schema.NUM_PATCHES,
  *,
  seed: int = 0,
  epoch: int = 0,
  indices: Optional[Sequence[int]] = None,
) -> dict:
  """Studies -> the pipeline's batch dict (``records.BATCH_KEYS``).

  ``num_kept`` patches per view are kept exactly as the training pipeline
  keeps them (``masking.mask_views`` seeded by (seed, epoch, index)); the
  default of all 196 patches is the evaluation layout.  ``indices`` stand in
  for record indices (default 0..N-1); labels are the one-hot zone.
  """
  n = len(studies)
  indices = np.arange(n) if indices is None else np.asarray(indices, np.int64)
  patches, patch_idx = zip(
    *(masking.mask_views(studies.images[i], num_kept, seed=seed, epoch=epoch, index=int(indices[i])) for i in range(n))
  )
  tokens = tokenizer(list(studies.texts))
  return {
    "patches": np.stack(patches),
    "patch_idx": np.stack(patch_idx).astype(np.int32),
    "view_valid": studies.view_valid.copy(),
    "input_ids": tokens["input_ids"],
    "attention_mask": tokens["attention_mask"],
    "labels": np.eye(NUM_ZONES, dtype=np.float32)[studies.zones],
    "example_valid": np.ones((n,), bool),
    "record_index": indices.astype(np.int64),
  }


def train_batch(step: int, batch_size: int, tokenizer, num_kept: int, *, seed: int = 0, views: str = "all") -> dict:
  """The masked training batch of one step: distinct zones, fresh images, a fresh mask.

  A pure function of (seed, step): the studies are drawn from a generator
  seeded by both, and masks use the step as the epoch.
  """
  rng = np.random.default_rng([int(seed), int(step)])
  zones = (
    distinct_zones(batch_size, rng)
    if batch_size <= NUM_ZONES
    else rng.integers(0, NUM_ZONES, batch_size).astype(np.int32)
  )
  studies = make_studies(zones, rng, views)
  return to_batch(
    studies, tokenizer, num_kept, seed=seed, epoch=step, indices=np.arange(batch_size) + int(step) * batch_size
  )
