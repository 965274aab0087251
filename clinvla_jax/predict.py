"""The one prediction function: sharded global embeddings of studies and reports.

Periodic evaluation, ``--mode=eval``, ``--mode=embed`` and the search index
all embed through a `PredictFn`, so they run on the training's mesh with the
training's logical rules: an FSDP- or tensor-sharded model stays sharded.

  predict = setup.predict_fn                     # from a train.TrainSetup, or
  predict = PredictFn.from_config(config)        # the mesh of config.mesh
  placed = predict.place(variables)              # once per set of weights
  out = predict(placed, batch, view_slots=(0,))  # {"image": [B, P], "text": [B, P]}

``batch`` holds this process's rows of the pipeline's batch contract
(``patches``, ``patch_idx``, ``view_valid``, ``input_ids``,
``attention_mask``); the result holds every process's rows, in order, as
host arrays.  The global batch must divide over the batch axes: round it with
`PredictFn.padded_batch_size`.

Texts run at the length they need (``config.eval.text_buckets``): a batch's
rows are grouped by the shortest bucket that holds their tokens
(`plan_text_groups`), each group embedded at its bucket's length, and the rows
put back in order.  The text tower pools its [CLS] token and masks padding keys,
so a row's embedding does not depend on how many padding tokens follow it: the
groups give the full-length embeddings up to float rounding.  A group holds the
batch, a half, a quarter or an eighth of it (`sub_batch_sizes`), so the text
function compiles at most 4 x (buckets below the full length + 1) shapes per
batch size.  With several processes every process gathers the batch's tokens
(a few KiB) and plans the same groups; each feeds its share of every group.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from clinvla_jax import api
from clinvla_jax import perf
from clinvla_jax import sharding
from clinvla_jax.data.records import fit_token_length
from clinvla_jax.evaluate import options as options_lib
from clinvla_jax.model.clinvla import ClinVLA, ClinVLAConfig, matmul_ready_params

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named "data" over ``devices`` (default: all of them); variables are replicated on it."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def config_mesh(config, mesh: Optional[Mesh] = None) -> Mesh:
  """``mesh``, else the training mesh of ``config.mesh``, else a data mesh over every device."""
  if mesh is not None:
    return mesh
  if hasattr(config, "get") and config.get("mesh") is not None:
    return sharding.make_mesh(config.mesh)
  return data_mesh()


def config_rules(config, mesh: Mesh) -> Optional[tuple]:
  """The config's logical axis rules when ``mesh`` has the training axes, else None (replicated variables)."""
  if hasattr(config, "get") and config.get("sharding") is not None and set(sharding.MESH_AXES) <= set(mesh.axis_names):
    return sharding.logical_rules(config)
  return None


def row_spec(mesh: Mesh) -> PartitionSpec:
  """Rows split like the training batch: over the batch axes the mesh has."""
  axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names) or (mesh.axis_names[0],)
  return PartitionSpec(axes if len(axes) > 1 else axes[0])


@functools.lru_cache(maxsize=None)
def variable_shardings(mcfg: ClinVLAConfig, mesh: Mesh, rules: Optional[tuple]):
  """Shardings of {"params": ...}: the logical rules' (as in training), or replicated without rules.

  Cached: every evaluation asks for the same tree, and building it traces the
  model's initialisation.
  """
  if rules is None:
    return NamedSharding(mesh, PartitionSpec())
  boxed = jax.eval_shape(api.init_fn(mcfg, boxed=True), jax.random.key(0))
  return {"params": sharding.param_shardings(boxed["params"], mesh, rules)}


@functools.lru_cache(maxsize=None)
def _encoders(
  mcfg: ClinVLAConfig, view_slots: Optional[tuple[int, ...]], mesh: Mesh, rules: Optional[tuple]
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  # Only the global embeddings leave the functions, so XLA drops the local
  # heads that embedding does not need.  Cached per (config, views, mesh,
  # rules): a PredictFn built twice reuses the compiled functions.
  model = ClinVLA(mcfg)
  variables = variable_shardings(mcfg, mesh, rules)
  rows = NamedSharding(mesh, row_spec(mesh))

  def image(params, patches, patch_idx, view_valid):
    out = model.apply(params, patches, patch_idx, view_valid, view_slots, method=ClinVLA.encode_image)
    return out["global"]

  def text(params, input_ids, attention_mask):
    return model.apply(params, input_ids, attention_mask, method=ClinVLA.encode_text)["global"]

  image_jit = jax.jit(image, in_shardings=(variables, rows, rows, rows), out_shardings=rows)
  text_jit = jax.jit(text, in_shardings=(variables, rows, rows), out_shardings=rows)
  if rules is None:
    return image_jit, text_jit

  def in_context(fn):
    # Traced under the mesh and the logical rules, so the model's activation
    # constraints shard as they do in training.
    def run(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn(*args)

    return run

  return in_context(image_jit), in_context(text_jit)


# A text group holds the batch or one of its first SUB_BATCH_HALVINGS halvings: few shapes to compile, and
# little padding (on the IU X-ray reports, 3 compute 6 % more tokens than groups of any row count would).
SUB_BATCH_HALVINGS = 3


def config_text_buckets(config) -> tuple[int, ...]:
  """``config.eval.text_buckets``, else its default (`options.EMBEDDING_DEFAULTS`)."""
  sub = config.get("eval") if hasattr(config, "get") else None
  buckets = sub["text_buckets"] if sub is not None and "text_buckets" in sub else None
  return tuple(int(b) for b in (options_lib.EMBEDDING_DEFAULTS["text_buckets"] if buckets is None else buckets))


def text_widths(buckets: Sequence[int], width: int) -> tuple[int, ...]:
  """The lengths texts of a ``width``-token batch run at: the buckets below ``width``, then ``width``."""
  return tuple(sorted({int(b) for b in buckets if b < width})) + (int(width),)


def sub_batch_sizes(batch: int, granule: int) -> tuple[int, ...]:
  """Rows a text group may hold: ``batch`` and its halvings, each rounded up to a multiple of ``granule``."""
  sizes = {-(-batch // 2**k) for k in range(SUB_BATCH_HALVINGS + 1)}
  return tuple(sorted({max(1, -(-s // granule)) * granule for s in sizes}))


def token_lengths(attention_mask: np.ndarray) -> np.ndarray:
  """int [B]: tokens up to and including each row's last real one (0 for a row without any)."""
  mask = np.asarray(attention_mask) > 0
  last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
  return np.where(mask.any(axis=1), last, 0)


@dataclasses.dataclass(frozen=True)
class TextGroup:
  """Rows of a batch embedded together: ``rows`` (batch indices), padded to ``size`` rows of ``width`` tokens."""

  rows: np.ndarray
  size: int
  width: int


def plan_text_groups(lengths: Sequence[int], widths: Sequence[int], sizes: Sequence[int]) -> list[TextGroup]:
  """Groups of a batch's rows, each at one of ``widths`` with one of ``sizes`` rows, fewest padded tokens first.

  The rows sorted longest first, each group is a run of them at the shortest
  width that holds its first (longest) row; a dynamic programme over the runs
  finds the fewest padded tokens (then the fewest groups): a few short rows
  ride in a longer group's padding rather than cost a group of their own.  A
  row without real tokens (a loader's padding row) counts as the shortest.

  Args:
    lengths: int [B] tokens each row needs (`token_lengths`), at most ``widths[-1]``.
    widths: increasing lengths to run at (`text_widths`).
    sizes: increasing row counts a group may have (`sub_batch_sizes`); the last is >= B.
  """
  lengths, widths, sizes = np.asarray(lengths), np.asarray(widths), np.asarray(sizes)
  order = np.argsort(-lengths, kind="stable")
  need = widths[np.minimum(np.searchsorted(widths, lengths[order]), len(widths) - 1)]
  n = len(order)
  # best[j]: (padded tokens, groups) of the first j rows; start[j]: where their last group begins.
  best = np.zeros((n + 1, 2))
  start = np.zeros(n + 1, np.int64)
  for j in range(1, n + 1):
    first = np.arange(j)
    rows = sizes[np.minimum(np.searchsorted(sizes, j - first), len(sizes) - 1)]
    cost = best[:j, 0] + rows * need[:j]
    ties = np.flatnonzero(cost == cost.min())
    i = int(ties[np.argmin(best[ties, 1])])
    best[j], start[j] = (cost[i], best[i, 1] + 1), i
  groups, j = [], n
  while j > 0:
    i = int(start[j])
    size = int(sizes[min(np.searchsorted(sizes, j - i), len(sizes) - 1)])
    groups.append(TextGroup(rows=order[i:j], size=size, width=int(need[i])))
    j = i
  return groups[::-1]


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
  """Smallest multiple of the mesh size that is >= batch_size."""
  n = mesh.size
  return max(1, -(-int(batch_size) // n)) * n


def to_host(x: jax.Array) -> np.ndarray:
  """Every process's rows of a row-sharded array, on the host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_host(local: np.ndarray) -> np.ndarray:
  """Every process's rows of a host array (this process's rows with one process)."""
  if jax.process_count() == 1:
    return np.asarray(local)
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


@dataclasses.dataclass(frozen=True)
class PredictFn:
  """Global image and report embeddings on one mesh, variables sharded by ``rules`` (or replicated without)."""

  model_config: ClinVLAConfig
  mesh: Mesh
  rules: Optional[tuple] = None
  text_buckets: tuple[int, ...] = options_lib.EMBEDDING_DEFAULTS["text_buckets"]

  @classmethod
  def from_config(cls, config, mesh: Optional[Mesh] = None) -> "PredictFn":
    """On ``mesh``, else the training mesh of ``config.mesh`` with the config's logical rules."""
    mesh = config_mesh(config, mesh)
    return cls(api.model_config(config), mesh, config_rules(config, mesh), config_text_buckets(config))

  @property
  def proj_dim(self) -> int:
    return self.model_config.proj_dim

  def padded_batch_size(self, batch_size: int) -> int:
    return padded_batch_size(batch_size, self.mesh)

  def place(self, variables) -> Any:
    """The variables where the encoders want them; call once per set of weights.

    The kernels are cast to the matmul dtype of the precision policy here,
    once, instead of inside every call.
    """
    return jax.device_put(
      matmul_ready_params(variables, self.model_config),
      variable_shardings(self.model_config, self.mesh, self.rules),
    )

  def global_rows(self, local: np.ndarray) -> jax.Array:
    """This process's rows -> one array split over the batch axes."""
    return jax.make_array_from_process_local_data(NamedSharding(self.mesh, row_spec(self.mesh)), local)

  def encoders(self, view_slots: Optional[Sequence[int]] = None):
    """(image_fn, text_fn) on global arrays: the jitted functions behind `images` and `texts`."""
    slots = tuple(int(s) for s in view_slots) if view_slots is not None else None
    return _encoders(self.model_config, slots, self.mesh, self.rules)

  def images(self, placed, patches, patch_idx, view_valid, view_slots: Optional[Sequence[int]] = None) -> np.ndarray:
    """float [B, P] unit rows from this process's patch batch; ``view_slots`` picks record views."""
    image_fn, _ = self.encoders(view_slots)
    rows = (self.global_rows(np.asarray(a)) for a in (patches, patch_idx, view_valid))
    return to_host(image_fn(placed, *rows))

  def texts(self, placed, input_ids, attention_mask) -> np.ndarray:
    """float [B, P] unit rows from this process's tokens (cut to the text tower's length).

    Grouped by length (``text_buckets``, module docstring); without buckets
    every row runs at the full length.
    """
    ids, mask = fit_token_length(np.asarray(input_ids), np.asarray(attention_mask), self.model_config.text.max_len)
    _, text_fn = self.encoders()
    if not self.text_buckets or not ids.size:
      return to_host(text_fn(placed, self.global_rows(ids), self.global_rows(mask)))
    # Every process plans from the whole batch, so all run the same groups in the same order.
    ids, mask = gather_host(ids), gather_host(mask)
    widths = text_widths(self.text_buckets, ids.shape[1])
    groups = plan_text_groups(token_lengths(mask), widths, sub_batch_sizes(len(ids), self.mesh.size))
    out = None
    for group in groups:
      emb = self._text_group(placed, text_fn, ids, mask, group)
      out = np.empty((len(ids), emb.shape[1]), emb.dtype) if out is None else out
      out[group.rows] = emb
    return out

  def _text_group(self, placed, text_fn, ids: np.ndarray, mask: np.ndarray, group: TextGroup) -> np.ndarray:
    """The embeddings of ``group.rows`` of the global batch (its padding rows repeat its longest row)."""
    rows = np.concatenate([group.rows, np.full(group.size - len(group.rows), group.rows[0])])
    share = group.size // jax.process_count()
    mine = rows[jax.process_index() * share :][:share]
    width = group.width
    emb = to_host(text_fn(placed, self.global_rows(ids[mine, :width]), self.global_rows(mask[mine, :width])))
    return emb[: len(group.rows)]

  def __call__(
    self,
    placed,
    batch: Mapping[str, np.ndarray],
    view_slots: Optional[Sequence[int]] = None,
    with_text: bool = True,
    times: Optional[perf.StageTimes] = None,
  ) -> dict[str, np.ndarray]:
    """{"image": [B, P]} (+ "text") of one batch, every process's rows.

    ``times``: adds the seconds of "embed_image" and "embed_text" (each through to the host arrays).
    """
    times = times or perf.NO_TIMES
    with times.stage("embed_image"):
      out = {"image": self.images(placed, batch["patches"], batch["patch_idx"], batch["view_valid"], view_slots)}
    if with_text:
      with times.stage("embed_text"):
        out["text"] = self.texts(placed, batch["input_ids"], batch["attention_mask"])
    return out
