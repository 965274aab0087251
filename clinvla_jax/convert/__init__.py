"""Loading peer checkpoints: HF BERT (text), timm / MAE / MRM ViT (image), whole ALTA models; moving trees between
block layouts."""

from clinvla_jax.convert.alta import load_alta
from clinvla_jax.convert.common import CheckpointError, read_state_dict
from clinvla_jax.convert.hf_bert import load_text_weights
from clinvla_jax.convert.layout import layer_layouts, stack_layers, to_layouts, to_model_layout, unstack_layers
from clinvla_jax.convert.timm_vit import load_image_weights

__all__ = [
  "CheckpointError",
  "layer_layouts",
  "load_alta",
  "load_image_weights",
  "load_text_weights",
  "read_state_dict",
  "stack_layers",
  "to_layouts",
  "to_model_layout",
  "unstack_layers",
]
