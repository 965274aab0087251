"""A tiny ClinVLA for unit tests: 2 + 2 layers of width 64.

What it is for: fast tests of every code path (towers, adapters, losses,
conversion, sharding) on a CPU.  Same structure as `configs/base.py`, only
smaller; image size stays 224 so the data contract (196 patches of 16 x 16)
holds.  How long it takes: init + one forward in about a second on 2 cores.
"""

from clinvla_jax.evaluate.options import evaluator_options
from configs import base
from configs import demo


def get_config():
  config = base.get_config()
  m = config.model
  m.image.update(num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128, adapter_dim=16)
  m.text.update(
    num_layers=2,
    hidden_size=64,
    num_heads=4,
    mlp_dim=128,
    vocab_size=30522,
    max_len=128,
    adapter_dim=16,
    dropout=0.0,
    attention_dropout=0.0,
  )
  m.proj_dim = 32
  # Exact: the peer-agreement tests compare to 1e-5; the bf16 policies have tests of their own.
  m.precision = "float32"
  config.optim.batch_size = 8
  # The bundled demo set: training data and held-out evaluation studies.
  config.data.train = demo.DEMO_DATA
  config.eval.batch_size = 16
  config.evals.covid_cxr = evaluator_options("retrieval", path=demo.DEMO_DATA, split="val")
  return config
