"""ALTA (Lian et al., IEEE TMI 2025), the PyTorch peer, as a configuration of this model.

What it is for: running ALTA's published checkpoint (``ALTA.pth``) in JAX and
scoring it on the published benchmark lists, so that numbers compare 1:1 with
the PyTorch implementation, or training ALTA's architecture from its start
weights.  The sizes are ALTA's: ViT-B/16 (MRM's weights and sin-cos table) and
CXR-BERT-specialized (BERT-base, 30,522-token vocabulary), projection 128.

The switches that differ from ClinVLA (``configs/base.py``):

  model.image.adapter_style="alta"         two GELU adapters per block (after attention; parallel to the MLP, x 0.5)
  model.image.adapter_dim=192              ALTA's bottleneck, h / 4
  model.image.missing_view_token="per_patch"  one learned token per patch position; a missing view keeps the CLS
  model.image.pos_embed="sincos_mrm"       MRM's / ALTA's fixed table (frequencies 1/10000^(i/dim))
  model.text.adapter_style="alta"          two GELU adapters per layer (after the attention LayerNorm; parallel to
                                           the FFN, x 0.5, after the output LayerNorm)
  model.text.invertible_adapter=False      ALTA has none
  model.head_style="alta"                  Linear(h->128) -> GELU -> LayerNorm(eps 1e-12) -> Linear(128->128)
  model.missing_view_pooling="all"         the CLS of all four views is averaged, missing ones included
  model.learn_local_temperatures=True      ALTA learns GLoRIA's three temperatures (start 1/0.07)

Evaluate ALTA's checkpoint (the vocabulary is CXR-BERT's, from its model folder)::

  python -m clinvla_jax.main --config=configs/alta.py --mode=eval --workdir=runs/alta \
    --config.init.alta_weights=ALTA.pth --config.init.vocab=BiomedVLP-CXR-BERT-specialized/vocab.txt \
    --config.evals.chexpert_5x200.path=DIR --config.evals.chexpert_5x200.list=chexpert_5x200.csv

How long it takes: like configs/base.py (same sizes): ``--mode=summary`` in
seconds, an evaluation of 1,000 images in minutes on a CPU.
"""

import math

from configs import base

# ALTA's adapters are bottlenecks of a quarter of the width.
ALTA_ADAPTER_RATIO = 0.25
ALTA_LOGIT_SCALE = 1 / 0.07


def apply_alta_architecture(config):
  """Sets ALTA's architecture switches on ``config`` (any sizes): the one place they are written."""
  m = config.model
  m.image.update(
    adapter_style="alta",
    adapter_dim=int(m.image.hidden_size * ALTA_ADAPTER_RATIO),
    missing_view_token="per_patch",
    pos_embed="sincos_mrm",
  )
  m.text.update(
    adapter_style="alta",
    adapter_dim=int(m.text.hidden_size * ALTA_ADAPTER_RATIO),
    use_adapters=True,
    invertible_adapter=False,
  )
  m.head_style = "alta"
  m.missing_view_pooling = "all"
  m.proj_dim = 128
  m.learn_local_temperatures = True
  m.local_temperatures = (ALTA_LOGIT_SCALE,) * 3
  m.logit_scale_init = math.log(ALTA_LOGIT_SCALE)
  # ALTA trains its heads, norms, adapters, CLS / view / time embeddings and logit scales; its missing
  # token stays at its start value.
  config.optim.param_groups = (
    (r".*(adapter|norm|LayerNorm|_head|cls_token|view_embed|time_embed|logit_scale|local_log_temperatures).*", "alta"),
    (r".*", "frozen"),
  )
  config.optim.learning_rates = {"alta": 1e-4}
  return config


def get_config():
  config = base.get_config()
  m = config.model
  m.text.update(vocab_size=30522, max_len=256)  # CXR-BERT's vocabulary; ALTA's retrieval tokenises to 256
  return apply_alta_architecture(config)
