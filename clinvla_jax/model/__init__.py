"""ClinVLA model: image tower (ViT), text tower (BERT + MAD-X adapters), heads."""

from clinvla_jax.model.bert import TextTower, TextTowerConfig
from clinvla_jax.model.clinvla import ClinVLA, ClinVLAConfig
from clinvla_jax.model.vit import ImageTower, ImageTowerConfig

__all__ = ["ClinVLA", "ClinVLAConfig", "ImageTower", "ImageTowerConfig", "TextTower", "TextTowerConfig"]
