"""The paper's setting (ClinVLA, Table 1): ViT-B/16 + BERT-base, 4 views, 75 % masking.

What it is for: training on MIMIC-CXR at accelerator scale and reproducing the
paper's numbers.  Hidden size h = 768, 12 + 12 layers, adapter bottleneck
d = 64, projection 128, 128 tokens, lambda = 0.8, batch 32, AdamW with
learning rates 5e-5 (language adapters) and 1e-4 (task adapters), weight
decay 1e-4.

How long it takes: `--mode=summary` runs in seconds anywhere (abstract shapes
only).  A train step at batch 32 takes about 10 s on a 2-core CPU in fp32, so
real training needs accelerators; point `model.text.pretrained` /
`model.image.pretrained` at BioBERT and MAE/MRM ViT-B/16 weights first.
"""

import math

import ml_collections


def get_model_config():
  model = ml_collections.ConfigDict()
  model.image = ml_collections.ConfigDict(dict(
      num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072, patch_size=16, image_size=224,
      channels=3, pos_embed="sincos", adapter_dim=64, adapter_init="identity", layer_norm_eps=1e-6,
      pixel_mean=0.4785, pixel_std=0.2834, dtype="float32", remat=False))
  model.text = ml_collections.ConfigDict(dict(
      num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072, vocab_size=28996, max_len=128,
      type_vocab_size=2, layer_norm_eps=1e-12, dropout=0.1, attention_dropout=0.1, use_adapters=True,
      adapter_dim=64, invertible_adapter=True, adapter_init="identity", dtype="float32", remat=False))
  model.proj_dim = 128
  model.multiview = True
  model.temporal = True
  model.logit_scale_init = math.log(1 / 0.07)
  model.local_temperatures = (4.0, 5.0, 10.0)
  model.learn_local_temperatures = False
  return model


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = get_model_config()

  # Where pretrained weights come from (local files only); empty = random init.
  config.init = ml_collections.ConfigDict()
  config.init.text_weights = ""     # HF BERT folder / .safetensors / .bin (BioBERT v1.1 in the paper)
  config.init.image_weights = ""    # timm / MAE / MRM ViT-B/16 state dict
  config.init.vocab = ""            # vocab.txt; empty = the text weights' folder, else the bundled one

  config.loss = ml_collections.ConfigDict()
  config.loss.global_type = "infonce"   # "infonce" (default, ALTA/CLIP) or "cosine" (the paper's literal 1 - cos)
  config.loss.local_type = "gloria"     # "gloria" (default) or "cosine" (the paper's literal per-region 1 - cos)
  config.loss.use_global = True
  config.loss.use_local = True
  config.loss.local_weight = 0.8        # lambda
  config.loss.max_logit_scale = math.log(100.0)

  config.data = ml_collections.ConfigDict()
  config.data.mask_ratio = 0.75
  config.data.max_text_len = 128

  config.optim = ml_collections.ConfigDict()
  config.optim.batch_size = 32
  config.optim.weight_decay = 1e-4
  # First matching rule names a parameter's group; "frozen" gets no gradient
  # and no optimizer state.  Every parameter must match some rule.
  config.optim.param_groups = (
      (r".*language_adapter/.*", "language_adapters"),
      (r".*task_adapter/.*", "task_adapters"),
      (r".*(adapter|norm|LayerNorm|_head|cls_token|view_embed|time_embed|missing_token|logit_scale"
       r"|local_log_temperatures).*", "other_trainable"),
      (r".*", "frozen"),
  )
  config.optim.learning_rates = ml_collections.ConfigDict(dict(
      language_adapters=5e-5, task_adapters=1e-4, other_trainable=1e-4))
  return config
