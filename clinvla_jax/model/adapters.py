"""MAD-X style adapters for the text tower (paper §3.1–3.2, protocols.md §3).

* ``InvertibleAdapter``: a NICE coupling block on the embedding output,
  o1 = e1 + F(e2), o2 = e2 + G(o1), with an exact inverse.
* Language and task adapters are ``layers.BottleneckAdapter`` instances placed
  by ``bert.BertLayer``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from clinvla_jax.model import layers


class _Coupling(nn.Module):
  """x (h/2) -> Linear(h/4) -> ReLU -> Linear(h/2)."""

  init_scheme: str = "identity"
  precision: layers.Precision = layers.Precision()

  @nn.compact
  def __call__(self, x):
    half = x.shape[-1]
    down_init, up_init = layers.adapter_initializers(self.init_scheme)
    y = layers.dense(half // 2, ("embed", "adapter"), name="down", precision=self.precision, kernel_init=down_init)(x)
    return layers.dense(half, ("adapter", "embed"), name="up", precision=self.precision, kernel_init=up_init)(
      nn.relu(y)
    )


class InvertibleAdapter(nn.Module):
  """NICE coupling: ``__call__`` is the forward map, ``inverse`` undoes it.

  With init="identity" both up-projections start at zero, so forward and
  inverse are the identity; with "bert" (the adapters library default) or
  "he" the map is a non-trivial bijection from the start.
  """

  init_scheme: str = "identity"
  precision: layers.Precision = layers.Precision()

  def setup(self):
    self.F = _Coupling(self.init_scheme, self.precision)
    self.G = _Coupling(self.init_scheme, self.precision)

  def _split(self, x):
    if x.shape[-1] % 4:
      raise ValueError(f"invertible adapter needs hidden_size % 4 == 0, got {x.shape[-1]}")
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]

  def __call__(self, e):
    e1, e2 = self._split(e)
    o1 = e1 + self.F(e2)
    o2 = e2 + self.G(o1)
    return jnp.concatenate([o1, o2], axis=-1)

  def inverse(self, o):
    o1, o2 = self._split(o)
    e2 = o2 - self.G(o1)
    e1 = o1 - self.F(e2)
    return jnp.concatenate([e1, e2], axis=-1)
