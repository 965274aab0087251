"""The bundled real demo set (covid-chestxray, 105 studies with prior studies) on a CPU.

What it is for: showing the whole method end to end on real chest X-rays and
notes on any laptop: a ViT with 6 layers of width 192 (ViT-Tiny width) and a
MiniLM-shaped text tower (width 384, 4 layers) over the bundled vocabulary,
4 views with 75 % masking, the paper's losses, adapters and learning rates.
Trained from random initialisation, so its retrieval numbers only show that
the machinery works; point `init.text_weights` / `init.image_weights` at real
pretrained weights for meaningful ones.

How long it takes: `./run.sh` (summary, 60 training steps, evaluation) about 2 minutes
on 2 idle CPU cores, about 5 minutes on a loaded one.
"""

import os

from configs import base

# The bundled demo set, found relative to this file (no package import needed).
DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clinvla_jax", "assets",
                         "demo", "covid_cxr")


def get_config():
  config = base.get_config()
  m = config.model
  m.image.update(num_layers=6, hidden_size=192, num_heads=3, mlp_dim=768, adapter_dim=16)
  m.text.update(num_layers=4, hidden_size=384, num_heads=6, mlp_dim=1536, vocab_size=30522, max_len=128,
                adapter_dim=32)
  m.proj_dim = 128
  config.optim.batch_size = 16
  config.optim.warmup_steps = 10
  config.data.train = DEMO_DATA
  config.train.num_steps = 60
  config.train.log_every_steps = 5
  config.train.checkpoint_every_steps = 20
  config.train.data_workers = 0
  # The held-out demo studies (13): P@50 is skipped as larger than the set.
  config.eval.batch_size = 16
  config.eval.datasets.covid_cxr = dict(path=DEMO_DATA, split="val")
  return config
