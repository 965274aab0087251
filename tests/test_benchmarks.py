"""The benchmark scripts run on the tiny config, and the PyTorch twin equals our model.

No timing assertions: timings depend on the machine and its load.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import torch
import timm  # noqa: F401  (the benchmarks import it)
import transformers  # noqa: F401  (the benchmarks import it)

import jax

from clinvla_jax import api, losses
from clinvla_jax import optim as optim_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
  from benchmarks import vs_pytorch

  cfg = vs_pytorch.build_config("tiny")
  mcfg = api.model_config(cfg)
  params = jax.device_get(api.init_params(cfg, jax.random.key(0))["params"])
  batch = vs_pytorch.synthetic_batch(mcfg, 4, 49)
  return cfg, mcfg, params, batch


def test_torch_twin_equals_jax_on_tiny(tiny):
  from benchmarks import torch_clinvla

  cfg, mcfg, params, batch = tiny
  assert not batch["view_valid"].all()  # missing views are exercised
  jax_model = api.build_model(cfg)

  # One compiled program: run eagerly, every op of the forward would compile on its own.
  @jax.jit
  def forward(params, batch):
    inputs = (batch[k] for k in ("patches", "patch_idx", "view_valid", "input_ids", "attention_mask"))
    out = jax_model.apply({"params": params}, *inputs)
    return out, losses.clinvla_loss(out, cfg.loss)[0]

  out_j, loss_j = forward(params, batch)
  model, _ = torch_clinvla.from_jax(mcfg, params, list(cfg.optim.param_groups))
  model.eval()
  tb = torch_clinvla.to_torch_batch(batch)
  with torch.no_grad():
    out_t = model(tb["patches"], tb["patch_idx"], tb["view_valid"], tb["input_ids"], tb["attention_mask"])
    loss_t = torch_clinvla.clinvla_loss(out_t, cfg.loss)
  for tower in ("image", "text"):
    for key in ("global", "local", "hidden"):
      diff = np.abs(np.asarray(out_j[tower][key]) - out_t[tower][key].numpy()).max()
      assert diff <= 1e-4, (tower, key, diff)
    np.testing.assert_array_equal(np.asarray(out_j[tower]["local_mask"]), out_t[tower]["local_mask"].numpy())
  assert abs(float(loss_j) - float(loss_t)) <= 1e-4
  # The comparison is not vacuous: adapters are non-zero ("bert" init) and outputs O(1).
  assert np.abs(np.asarray(out_j["text"]["hidden"])).mean() > 0.1


def test_torch_twin_freezes_what_the_path_rules_freeze(tiny):
  from benchmarks import torch_clinvla

  cfg, mcfg, params, _ = tiny
  model, groups = torch_clinvla.from_jax(mcfg, params, list(cfg.optim.param_groups))
  counts = optim_lib.check_rules(params, list(cfg.optim.param_groups), cfg.optim.learning_rates)
  trainable_torch = sum(p.numel() for p in model.parameters() if p.requires_grad)
  assert trainable_torch == sum(n for g, n in counts.items() if g != optim_lib.FROZEN)
  assert groups["text_tower.bert.encoder.layer.0.output.dense.weight"] == optim_lib.FROZEN
  assert groups["text_tower.bert.encoder.layer.0.output.language_adapter.down.weight"] == "language_adapters"
  assert groups["image_tower.vit.blocks.0.norm1.weight"] == "other_trainable"


def test_inverse_transform_undoes_converter_transforms():
  from benchmarks.torch_clinvla import _inverse_transform
  from clinvla_jax.convert import common, timm_vit

  rng = np.random.RandomState(0)
  for transform, shape in (
    (common.linear_kernel(3, 4, 2), (24, 5)),
    (common.linear_kernel_in(4, 2), (6, 8)),
    (timm_vit.patch_kernel, (8, 3, 4, 4)),
    (common.reshape_to(3, 4), (12,)),
  ):
    theirs = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(_inverse_transform(transform, transform(theirs), shape), theirs)


def _run(args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
    [sys.executable] + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_vs_pytorch_runs_on_tiny(tmp_path):
  out = tmp_path / "vs.json"
  _run(["benchmarks/vs_pytorch.py", "--config=tiny", "--batch=2", "--steps=1", "--warmup=1", f"--out={out}"])
  result = json.loads(out.read_text())
  for key in (
    "max_abs_diff",
    "train_step_s_jax",
    "train_step_s_torch",
    "train_step_ratio",
    "embed_s_jax",
    "embed_s_torch",
    "embed_ratio",
    "config",
    "batch",
    "machine",
  ):
    assert key in result, key
  assert result["max_abs_diff"] <= 1e-4
  assert result["xla_flops_train_step"] > 0 and result["analytic_flops_train_step"] > 0


@pytest.mark.slow
def test_vs_pytorch_times_one_study_embeddings_without_a_train_step():
  # gpu.sh's embed_latency and no-dropout runs, in-process on the tiny config: the embedding part
  # alone, one study per call, train dropout off.
  from benchmarks import vs_pytorch

  result = vs_pytorch.run("tiny", batch=2, steps=1, warmup=1, dropout=False, parts=("embed",), embed_batch=1)
  assert result["max_abs_diff"] <= 1e-4 and result["dropout"] is False
  assert result["embed_batch"] == 1 and "train_step_s_jax" not in result
  assert result["embed_ms_per_study_jax"] > 0 and result["embed_ms_per_study_torch"] > 0


@pytest.mark.slow
def test_gpu_script_runs_its_first_run_on_cpu_with_tiny(tmp_path):
  # The same script, flags and file names as on a GPU, on the CPU backend, for its first (bf16) run;
  # the vs_pytorch tests above cover the other runs' options (fp32, one-study embedding, no dropout).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(CONFIG="tiny", BATCH="2", ATTENTION="xla", ALLOW_CPU="1", PYTHON=sys.executable, ONLY="vs_pytorch_bf16")
  proc = subprocess.run(
    ["bash", "benchmarks/gpu.sh", str(tmp_path)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "== vs_pytorch_bf16: exit 0" in proc.stdout, proc.stdout[-3000:]
  for name in ("embed_latency_bf16", "vs_pytorch_bf16_nodrop", "vs_pytorch_fp32"):
    assert f"== {name}: skipped (ONLY=vs_pytorch_bf16)" in proc.stdout, name
    assert not (tmp_path / f"{name}.json").exists(), name
  bf16 = json.loads((tmp_path / "vs_pytorch_bf16.json").read_text())
  assert bf16["complete"] and bf16["max_abs_diff"] <= 1e-4
  assert bf16["dtype"] == "bfloat16" and bf16["dropout"] is True
  # A 16-bit run times PyTorch in fp32 too and measures the policy against fp32 JAX.
  for key in (
    "train_step_s_torch_fp32",
    "train_step_ratio_vs_torch_fp32",
    "embed_s_torch_fp32",
    "embed_ratio_vs_torch_fp32",
    "train_step_s_torch_bf16",
    "embed_s_torch_bf16",
  ):
    assert bf16[key] > 0, key
  assert bf16["train_step_ratio_vs_torch_fp32"] == pytest.approx(
    bf16["train_step_s_jax"] / bf16["train_step_s_torch_fp32"]
  )
  assert 0 <= bf16["bf16_vs_fp32_max_abs_diff"] < 0.1 and bf16["bf16_vs_fp32_min_cosine"] > 0.99
  assert (tmp_path / "runs.log").read_text().count("== ClinVLA tiny") == 1


@pytest.mark.parametrize("part", [pytest.param("train", marks=pytest.mark.slow), "embed"])
def test_profile_breakdown_classifies_the_compiled_step(part):
  from benchmarks import profile_step

  result = profile_step.profile("tiny", batch=2, steps=1, part=part)
  assert result["part"] == part
  shares = result["op_share_by_kind"]
  assert set(shares) == set(profile_step.KINDS)
  assert abs(sum(shares.values()) - 1.0) < 1e-6
  # A transformer step is mostly matmuls and fused elementwise work; both must be seen.
  assert shares["matmul"] > 0 and shares["fused elementwise / reduction"] > 0
  assert result["matched_instructions"] > 50
  by_part = result["op_seconds_by_part"]
  assert set(by_part) == set(profile_step.PARTS)
  assert sum(by_part.values()) == pytest.approx(result["op_seconds_total"])


def test_matmul_rates_count_flops_and_time_both_frameworks():
  from benchmarks import matmul_rates

  assert matmul_rates._flops("mk,kn->mn", (3, 4), (4, 5)) == 2 * 3 * 4 * 5
  assert matmul_rates._flops("bqd,bkd->bqk", (2, 3, 4), (2, 5, 4)) == 2 * 2 * 3 * 5 * 4
  rows = matmul_rates.measure(scale=0.05, repeats=1)
  assert [r["name"] for r in rows] == [name for name, *_ in matmul_rates.BASE_SHAPES]
  for r in rows:
    assert r["jax_s"] > 0 and r["torch_s"] > 0 and r["flops"] > 0


@pytest.mark.slow
def test_xla_options_compares_variants_in_one_process(tmp_path):
  from benchmarks import xla_options

  out = tmp_path / "xo.json"
  result = xla_options.main(
    [
      "--config=tiny",
      "--batch=2",
      "--steps=1",
      "--warmup=1",
      '--variant=vec512={"xla_cpu_prefer_vector_width": 512}',
      f"--out={out}",
    ]
  )
  assert json.loads(out.read_text())["train"].keys() == result["train"].keys() == {"default", "vec512", "torch"}
  for part in ("train", "embed"):
    rows = result[part]
    assert rows["default"]["vs_default"] == 1.0 and rows["torch"]["vs_torch"] == 1.0
    for row in rows.values():
      assert row["median_s"] > 0 and len(row["times"]) == 1
  assert result["variants"]["vec512"] == {"xla_cpu_prefer_vector_width": 512}


@pytest.mark.parametrize("text, message", [("novalue", "NAME=JSON"), ("x={bad", "not JSON"), ("x=[1]", "JSON object")])
def test_xla_options_rejects_malformed_variants(text, message):
  from benchmarks import xla_options

  with pytest.raises(ValueError, match=message):
    xla_options.parse_variant(text)


def test_hlo_operation_kinds_reads_fusions():
  from benchmarks import profile_step

  hlo = """
%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %add.1 = f32[4,4]{1,0} add(%p0, %p0)
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %ynn_fusion.3 = f32[4,4]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
  %add_fusion.2 = f32[4,4]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_add
  %copy_fusion.5 = f32[4,4]{0,1} fusion(%add_fusion.2), kind=kLoop, calls=%fused_add
  ROOT %transpose.4 = f32[4,4]{1,0} transpose(%copy_fusion.5), dimensions={1,0}
}
"""
  kinds = profile_step.hlo_operation_kinds(hlo)
  assert kinds["ynn_fusion.3"] == "matmul"
  assert kinds["add_fusion.2"] == "fused elementwise / reduction"
  assert kinds["copy_fusion.5"] == "data movement"
  assert kinds["transpose.4"] == "data movement"


def test_hlo_operation_parts_tell_what_fusions_compute():
  from benchmarks import profile_step

  hlo = """
%rng (p0: u32[8]) -> u32[8] {
  %p0 = u32[8]{0} parameter(0)
  %c = u32[8]{0} constant({...})
  %x = u32[8]{0} xor(%p0, %c)
  ROOT %s = u32[8]{0} shift-right-logical(%x, %c)
}

%to_bf16 (p0: f32[8]) -> bf16[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %c.1 = bf16[8]{0} convert(%p0)
}

%soft (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %e = f32[8]{0} exponential(%p0)
}

%gelu (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %m = f32[8]{0} multiply(%p0, %p0)
  ROOT %d = f32[8]{0} divide(%m, %p0)
}

ENTRY %main (a: f32[8], b: u32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %b = u32[8]{0} parameter(1)
  %xor_fusion.1 = u32[8]{0} fusion(%b), kind=kLoop, calls=%rng
  %convert_fusion.2 = bf16[8]{0} fusion(%a), kind=kLoop, calls=%to_bf16
  %exp_fusion.3 = f32[8]{0} fusion(%a), kind=kLoop, calls=%soft
  %div_fusion.4 = f32[8]{0} fusion(%a), kind=kLoop, calls=%gelu
  ROOT %transpose.5 = f32[8]{0} transpose(%div_fusion.4), dimensions={0}
}
"""
  parts = profile_step.hlo_operation_parts(hlo, profile_step.hlo_operation_kinds(hlo))
  assert parts["xor_fusion.1"] == "random bits (dropout)"
  assert parts["convert_fusion.2"] == "dtype converts"
  assert parts["exp_fusion.3"] == "softmax (exp)"
  assert parts["div_fusion.4"] == "other elementwise"
  assert parts["transpose.5"] == "transposes / copies"
  assert set(parts.values()) <= set(profile_step.PARTS)


@pytest.mark.slow  # full tier: a fresh interpreter importing the benchmarks (torch, timm, transformers)
def test_training_step_and_benchmarks_import_without_grain():
  # Accelerator images often carry JAX, Flax, Optax and Orbax but not Grain.
  code = (
    "import sys; sys.modules['grain'] = None\n"
    "from clinvla_jax.train import make_train_step\n"
    "from benchmarks import vs_pytorch, torch_clinvla\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_ablations_train_the_text_adapters_the_demo_freezes():
  from benchmarks import ablations
  from clinvla_jax import optim
  from clinvla_jax.config import load_config

  adapter = "text_tower/layer_0/language_adapter/down/kernel"
  demo_rules = load_config(os.path.join(REPO, "configs", "demo.py")).optim.param_groups
  assert optim.group_of(adapter, demo_rules) == "frozen"
  overrides = ablations.adapters_trained("configs/demo.py")
  assert optim.group_of(adapter, overrides["optim.param_groups"]) == "language_adapters"
  assert optim.group_of("image_tower/block_0/mlp/kernel", overrides["optim.param_groups"]) == "image_tower"
  assert ablations.adapters_trained("configs/tiny.py") == {}  # nothing frozen there to undo


@pytest.mark.slow
def test_ablations_train_and_evaluate_each_variant_on_tiny(tmp_path):
  from benchmarks import ablations

  out = tmp_path / "ablations.json"
  proc = _run(
    [
      "benchmarks/ablations.py",
      "--config=configs/tiny.py",
      "--variants=full,-global_loss",
      "--steps=2",
      f"--workdir={tmp_path / 'runs'}",
      f"--out={out}",
    ]
  )
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["full", "-global_loss"]
  metric = "covid_cxr/image_to_text/P@5"
  for r in rows:
    assert 0.0 <= r[metric + "_ci_low"] <= r[metric] <= r[metric + "_ci_high"] <= 1.0, r
    assert 0.0 < r[metric + "_chance"] < 1.0, r
  saved = json.loads((tmp_path / "runs" / "global_loss" / "results.json").read_text())
  assert metric in saved
  # Each variant really ran with its switch: its training log has no global loss, the full run's has.
  metrics_log = (tmp_path / "runs" / "global_loss" / "metrics.jsonl").read_text()
  assert "loss_global" not in metrics_log and "loss_local" in metrics_log
  assert "loss_global" in (tmp_path / "runs" / "full" / "metrics.jsonl").read_text()
  assert "| -global_loss |" in proc.stdout
  with pytest.raises(SystemExit):
    ablations.main(["--variants=-nothing"])


@pytest.mark.slow
def test_scaling_runs_on_tiny(tmp_path):
  out = tmp_path / "scaling.json"
  _run(
    [
      "benchmarks/scaling.py",
      "--config=tiny",
      "--batches=2",
      "--devices=2",
      "--per_device_batch=1",
      "--fsdp=2",
      "--fsdp_batch=2",
      "--steps=1",
      f"--out={out}",
    ]
  )
  result = json.loads(out.read_text())
  points = result["batch"] + result["devices"] + result["fsdp"]
  assert points and not [p for p in points if "error" in p], points
  data_parallel, fsdp = result["fsdp"]
  # FSDP shards the parameters: smaller arguments per device than data parallel.
  assert fsdp["argument_size_in_bytes"] < data_parallel["argument_size_in_bytes"]


@pytest.mark.slow
def test_search_benchmark_splits_indexing_into_stages_and_compares_text_buckets(tmp_path, shared_data):
  out = tmp_path / "search.json"
  reports = shared_data / "iu_xray" / "NLMCXR_reports.tgz"
  _run(
    [
      "benchmarks/search.py",
      "--rows=1000",
      "--config=configs/tiny.py",
      "--text_configs=configs/tiny.py",
      "--text_reports=32",
      "--text_repeats=1",
      f"--iu_reports={reports}",
      f"--out={out}",
    ]
  )
  result = json.loads(out.read_text())
  stages = {"decode", "embed_image", "embed_text", "read_headers", "write", "other"}
  assert set(result["indexing"]["warm_stages_s"]) == stages
  (text,) = result["text_buckets"]
  assert text["reports"] == 32 and text["max_abs_diff"] < 1e-5
  # The buckets compute fewer tokens than the full length on real reports.
  assert text["bucketed"]["computed_tokens"] < text["full_length"]["computed_tokens"] == 32 * 128  # 2 batches of 16


@pytest.mark.slow
def test_loop_overhead_times_bare_and_loop_on_the_same_batches(tmp_path):
  out = tmp_path / "loop.json"
  _run(["benchmarks/loop_overhead.py", "--steps=12", "--log_every=3", "--repeats=1", f"--out={out}"])
  result = json.loads(out.read_text())
  assert set(result["step_s"]) == {"bare", "bare_put", "loop"}
  assert all(t > 0 for t in result["step_s"].values())
  assert result["loop_vs_bare"] == pytest.approx(result["step_s"]["loop"] / result["step_s"]["bare"])


@pytest.mark.slow
@pytest.mark.multidevice
def test_loss_memory_writes_rows_and_sharded_temporaries_grow_slower(tmp_path):
  from benchmarks import loss_memory

  out = tmp_path / "loss_memory.json"
  # Batches 16 -> 64 on 8 devices: 2 -> 8 examples per device, chunks of 2 texts.
  result = loss_memory.main(
    ["--devices=8", "--batches=16,64", "--parts=local,infonce", "--chunk_size=2", f"--out={out}"]
  )
  saved = json.loads(out.read_text())
  assert saved["rows"] == result["rows"] and len(saved["rows"]) == 2 * 2 * 2
  for row in saved["rows"]:
    assert {"impl", "devices", "global_batch", "temp_bytes_per_device", "arg_bytes_per_device"} <= set(row)
    assert row["devices"] == 8 and row["impl"] in ("dense", "sharded") and row["temp_bytes_per_device"] > 0
  assert saved["shapes"] == {"regions": 196, "words": 128, "dim": 128}  # configs/base.py
  growth = saved["growth"]
  # Dense word-region temporaries grow with the square of the batch (x16 here), sharded ones about linearly.
  assert growth["local/sharded"] < 6 < 12 < growth["local/dense"], growth


def test_runtime_configuration_is_idempotent():
  from clinvla_jax import runtime

  # Under pytest (no re-exec possible for a live backend) it only reports.
  info = runtime.configure_host_runtime(preload_tcmalloc=False, xla_flags=())
  assert set(info) == {"tcmalloc", "tcmalloc_loaded", "xla_flags"}
  assert runtime._merged_xla_flags("--a=1", ["--a=2", "--b=3"]) == "--a=1 --b=3"


def test_demo_recipes_are_whole_overrides_and_the_chosen_one_is_the_demo():
  from benchmarks import demo_recipes
  from clinvla_jax.config import load_config

  demo_path = os.path.join(REPO, "configs", "demo.py")
  demo = load_config(demo_path)
  built = {name: load_config(demo_path, overrides) for name, overrides in demo_recipes.RECIPES.items()}
  # configs/demo.py is the recipe the RESULTS table calls the demo; the former demos stay reproducible.
  assert built["textfixed_200"].to_dict() == demo.to_dict()
  assert demo.optim.param_groups[0] == (r"text_tower/.*", "frozen")
  former = built["short_lr3e-4"]
  assert (former.train.num_steps, former.optim.warmup_steps) == (100, 10)
  # The former demo trained the text tower's adapters: the one rule it lacks is the demo's first.
  assert tuple(former.optim.param_groups) == tuple(demo.optim.param_groups)[1:]
  today = built["today"]
  assert (today.train.num_steps, today.optim.warmup_steps, today.data.augment.enabled) == (200, 20, False)
  assert {today.optim.learning_rates[g] for g in demo_recipes.TRAINED_GROUPS} == {1e-4}
  assert {demo.optim.learning_rates[g] for g in demo_recipes.TRAINED_GROUPS} == {3e-4}
  assert built["augment"].data.augment.enabled and not demo.data.augment.enabled
  assert len({json.dumps(c.to_dict(), sort_keys=True, default=str) for c in built.values()}) == len(built)


def test_pipeline_benchmark_times_compiled_and_numpy_augmentation_in_one_run(tmp_path):
  out = tmp_path / "pipeline.json"
  proc = _run(
    [
      "benchmarks/pipeline.py",
      "--num_records=160",
      "--distinct=4",
      "--batch_size=8",
      "--num_batches=2",
      "--warmup_batches=1",
      "--workers=0,1",
      "--modes=train_augment,train_augment_numpy",
      "--read_probe=20",
      "--notfds",
      f"--tmp_dir={tmp_path}",
      f"--out={out}",
    ]
  )
  result = json.loads(out.read_text())
  rows = {(r["mode"], r["workers"]) for r in result["pipeline"]}
  # The numpy switch holds in this process only: no row for it with a worker.
  assert rows == {("train_augment", 0), ("train_augment", 1), ("train_augment_numpy", 0)}
  ratio = result["augment_compiled_vs_numpy"]["synthetic"]
  assert ratio["studies_per_s"] > 0 and ratio["studies_per_cpu_s"] > 0
  assert "compiled augmentation / numpy reference" in proc.stdout


def test_demo_probe_scores_features_and_splits_p5_by_finding(tmp_path):
  from benchmarks import demo_probe
  from clinvla_jax.data import source as source_lib
  from clinvla_jax.evaluate.labels import positive_labels
  from configs import demo

  # Planted embeddings: every COVID-19 study at one point, every other at another (with a little noise), so a probe
  # separates them perfectly and a COVID-19 query's five nearest studies are all COVID-19.
  rng = np.random.default_rng(0)
  target = list(source_lib.read_manifest(demo.DEMO_DATA)["label_names"]).index(demo_probe.TARGET)
  for split in ("train", "val"):
    labels = np.stack([s["labels"] for s in demo_probe.load_split(demo.DEMO_DATA, split)])
    covid = positive_labels(labels)[:, target]
    points = np.where(covid[:, None], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]) + 0.01 * rng.normal(size=(len(covid), 3))
    np.savez(tmp_path / f"emb_{split}.npz", image_global=points, text_global=points)
  out = demo_probe.main(["--embeddings=" + str(tmp_path / "emb")])
  assert out["auc"]["run image_global"] == [1.0, 1.0, 1.0]
  # The bundled notes name their findings often enough for the frozen text tower; pooled pixels less so.
  text_auc = min(out["auc"]["MiniLM frozen, cls"])
  assert text_auc > 0.8 and max(out["auc"]["pixels 8x8"]) < text_auc
  t2i = out["p5"]["text->image"]
  assert t2i["COVID-19"] == 1.0
  assert t2i["all"] == pytest.approx((22 * t2i["COVID-19"] + 14 * t2i["other"]) / 36)  # 22 of the 36 val studies
