"""The paper's setting (ClinVLA, Table 1): ViT-B/16 + BERT-base, 4 views, 75 % masking.

What it is for: training on MIMIC-CXR at accelerator scale and reproducing the
paper's numbers.  Hidden size h = 768, 12 + 12 layers, adapter bottleneck
d = 64, projection 128, 128 tokens, lambda = 0.8, batch 32, AdamW with
learning rates 5e-5 (language adapters) and 1e-4 (task adapters), weight
decay 1e-4.

How long it takes: `--mode=summary` runs in seconds anywhere (abstract shapes
only).  A train step at batch 32 takes about 10 s on a 2-core CPU in fp32, so
real training needs accelerators; point `init.text_weights` /
`init.image_weights` at BioBERT and MAE/MRM ViT-B/16 weights first.
"""

import dataclasses
import math

import ml_collections

from clinvla_jax import losses
from clinvla_jax.data import augment
from clinvla_jax.evaluate import options
from clinvla_jax.evaluate.options import evaluator_options
from clinvla_jax.model import clinvla
from clinvla_jax.model.clinvla import ClinVLAConfig


def get_model_config():
  """The model part: every default read from the model's own dataclasses.

  The dataclasses (`ClinVLAConfig`, `ImageTowerConfig` = ViT-B/16 with the
  paper's adapters, `TextTowerConfig` = BERT-base with MAD-X adapters) hold
  the paper's values, so no default is written twice; tests/test_config.py
  checks that this ConfigDict and the dataclasses agree.  Only switches that
  are resolved when the model is built (per backend) are added here.
  """
  fields = dataclasses.asdict(ClinVLAConfig())
  # Set through the loss config (sigmoid loss) and per backend below, not here.
  fields.pop("logit_bias_init")
  for tower in ("image", "text"):
    fields[tower].pop("residual_grad_barrier")
  model = ml_collections.ConfigDict(fields)
  # Mixed precision (clinvla_jax.model.layers.POLICIES): "auto" is bf16 operands with
  # float32 products on a CPU with bf16 hardware (float32 without), bf16 on GPU/TPU;
  # "float32" is exact.  A tower's own `precision` overrides it.
  model.precision = "auto"
  # "auto": on CPU, materialise each block's residual gradient (layers.residual_grad_barrier;
  # 25 % off the base train step there); "on" / "off" force it.
  model.residual_grad_barrier = "auto"
  return model


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = get_model_config()

  # Where pretrained weights come from (local files only); empty = random init.
  config.init = ml_collections.ConfigDict()
  config.init.text_weights = ""  # HF BERT folder / .safetensors / .bin (BioBERT v1.1 in the paper)
  # timm / MAE / MRM ViT-B/16 state dict.  MRM's weights were trained with MRM's own sin-cos table:
  # set model.image.pos_embed="sincos_mrm" with them (the loader checks the checkpoint's pos_embed
  # against the configured table and names the setting when they differ).
  config.init.image_weights = ""
  # A whole ALTA checkpoint (ALTA.pth, convert.load_alta); needs ALTA's architecture: configs/alta.py.
  config.init.alta_weights = ""
  config.init.vocab = ""  # vocab.txt; empty = the text weights' folder, else the bundled one

  config.loss = ml_collections.ConfigDict()
  # "infonce" (default, ALTA/CLIP), "sigmoid" (SigLIP, an extension) or "cosine" (the paper's literal 1 - cos)
  config.loss.global_type = "infonce"
  config.loss.local_type = "gloria"  # "gloria" (default) or "cosine" (the paper's literal per-region 1 - cos)
  config.loss.use_global = True
  config.loss.use_local = True
  config.loss.local_weight = 0.8  # lambda
  config.loss.max_logit_scale = math.log(100.0)
  # global_type="sigmoid" only: the model then starts its logit scale here (t = 10) and adds a
  # learnable logit bias, SigLIP's initialisation.
  config.loss.sigmoid_logit_scale_init = clinvla.SIGMOID_LOGIT_SCALE_INIT
  config.loss.sigmoid_logit_bias_init = clinvla.SIGMOID_LOGIT_BIAS_INIT
  # Texts per word-region block of the GLoRIA loss when the batch is sharded over devices:
  # per-device memory is about (local batch) x chunk_size x regions x words floats.
  config.loss.chunk_size = losses.DEFAULT_CHUNK_SIZE

  config.data = ml_collections.ConfigDict()
  config.data.mask_ratio = 0.75
  # Training views, before masking: random affine (rotation, x shear, shift, scale) and brightness/contrast
  # jitter, ALTA's ranges (clinvla_jax/data/augment.py); enabled=False trains on the stored pixels.
  # Evaluation and embedding never augment.
  config.data.augment = ml_collections.ConfigDict(augment.config_defaults())
  config.data.max_text_len = 128
  config.data.train = ""  # a converter output folder (or shard files / glob); required to train
  config.data.train_split = "train"
  config.data.eval = ""  # a converter output folder for --mode=embed (and a default evaluation set)
  config.data.eval_split = ""  # "" = every split of config.data.eval

  # How studies are embedded: by every evaluator, --mode=embed and the search index.
  # batch_size (global, rounded up to a multiple of the device count), views ("frontal": the current frontal
  # only, as the protocols score; "all": every view the model uses) and text_buckets (the token lengths texts run
  # at: each at the shortest bucket that holds it, longer ones at model.text.max_len; (): all at full length).
  config.eval = ml_collections.ConfigDict(options.EMBEDDING_DEFAULTS)

  # Evaluators by name (--mode=eval runs every one with a path; training runs each every
  # `every_steps`).  Results are keyed "<name>/<task>/<metric>" (clinvla_jax/evaluate/run.py);
  # each type's options and defaults: clinvla_jax/evaluate/options.py.  The published protocols
  # (protocols.md section 5) are listed with empty paths: `--config.evals.rsna.path=DIR` enables one.
  # A dataset of your own: config.evals.NAME = evaluator_options("retrieval", path=DIR, split="val").
  config.evals = ml_collections.ConfigDict()
  # data_prep.chexpert --mode=5x200 --list_csv=chexpert_5x200.csv; + list= (the published list, as papers score)
  config.evals.chexpert_5x200 = evaluator_options("chexpert_5x200")
  config.evals.chexpert_8x200 = evaluator_options("chexpert_8x200")  # --mode=list; + queries=, lists=
  config.evals.rsna = evaluator_options("rsna")  # converted RSNA Pneumonia; + list= (ALTA's test_list.txt)
  config.evals.ms_cxr_t = evaluator_options("ms_cxr_t")  # MIMIC-CXR with priors; + labels= (CSV)

  config.optim = ml_collections.ConfigDict()
  config.optim.batch_size = 32
  config.optim.weight_decay = 1e-4
  # First matching rule names a parameter's group; "frozen" gets no gradient
  # and no optimizer state.  Every parameter must match some rule.
  config.optim.param_groups = (
    (r".*language_adapter/.*", "language_adapters"),
    (r".*task_adapter/.*", "task_adapters"),
    (
      r".*(adapter|norm|LayerNorm|_head|cls_token|view_embed|time_embed|missing_token|logit_scale"
      r"|logit_bias|local_log_temperatures).*",
      "other_trainable",
    ),
    (r".*", "frozen"),
  )
  config.optim.learning_rates = ml_collections.ConfigDict(
    dict(language_adapters=5e-5, task_adapters=1e-4, other_trainable=1e-4)
  )
  config.optim.warmup_steps = 500
  config.optim.min_lr_ratio = 0.01
  config.optim.grad_clip_norm = 1.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 50_000
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 1000
  config.train.keep_checkpoints = 3  # the last N; the best by best_metric is kept as well
  config.train.best_metric = ""  # a results.json key, e.g. "chexpert_5x200/image_to_text/P@10"
  config.train.best_mode = "max"
  config.train.data_workers = 2  # Grain worker processes (0 = in-process)
  config.train.prefetch_to_device = 2  # batches put on the devices ahead of the step (0 = on demand)
  config.train.transfer_guard = "allow"  # "log" / "disallow": report / refuse implicit transfers in the step loop
  config.train.peak_flops_per_device = 0.0  # for MFU; 0 = look up by device kind (CPU: measured matmul rate)

  # Mesh ('data', 'fsdp', 'tensor'); one axis may be -1 (all remaining devices).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = ml_collections.ConfigDict()
  # Logical axis -> mesh axes.  Parameter axes: embed, mlp, heads, kv, vocab,
  # patch, adapter, proj; activation axes: batch, act_*.  With fsdp = tensor = 1
  # (the default) every parameter is replicated: pure data parallelism.
  config.sharding.rules = (
    ("batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_kv", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("patch", None),
    ("adapter", None),
    ("proj", None),
    ("layers", None),
  )
  return config
