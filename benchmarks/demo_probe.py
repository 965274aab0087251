"""How much of the demo's findings each input carries: linear probes on the bundled set, held out by patient.

    python benchmarks/demo_probe.py
    python benchmarks/demo_probe.py --embeddings=/tmp/emb   # also a run's /tmp/emb_{train,val}.npz (--mode=embed)

Fits a logistic regression (COVID-19 against every other finding, on the training studies with a label) at three
strengths of L2 regularisation and scores the val split's AUC, for features that need no training here: the
current frontal view averaged down to 8x8 and 16x16 pixels, and the frozen all-MiniLM-L6-v2 text tower's CLS and
mean-pooled outputs.  With ``--embeddings`` it does the same for a trained run's global image and text embeddings
and splits the run's P@5 by the query's finding.  It also prints how many studies hold each finding in each split:
a finding seen once or twice in training cannot be learnt, whatever the recipe.

A probe sees the labels; contrastive training never does.  So a probe's AUC bounds what a feature makes possible,
and the gap between it and the run's zero-shot AUC or P@5 is what the alignment misses.  Takes about 20 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=wrong-import-position
from sklearn.linear_model import LogisticRegression  # pylint: disable=wrong-import-position
from sklearn.metrics import roc_auc_score  # pylint: disable=wrong-import-position

from clinvla_jax.data import records  # pylint: disable=wrong-import-position
from clinvla_jax.data import source as source_lib  # pylint: disable=wrong-import-position
from clinvla_jax.evaluate import embed as embed_lib  # pylint: disable=wrong-import-position
from clinvla_jax.evaluate.labels import positive_labels  # pylint: disable=wrong-import-position
from clinvla_jax.evaluate import metrics  # pylint: disable=wrong-import-position
from configs import demo  # pylint: disable=wrong-import-position

STRENGTHS = (0.01, 0.1, 1.0)  # the inverse L2 strength C of scikit-learn
TARGET = "COVID-19"  # the only finding with enough studies on both sides to probe


def load_split(folder: str, split: str) -> list[dict]:
  return [
    records.decode_record(raw) for path in embed_lib.split_paths(folder, split) for raw in source_lib.read_all(path)
  ]


def pooled_pixels(studies: list[dict], size: int) -> np.ndarray:
  frontal = np.stack([s["images"][0] for s in studies]).astype(np.float32) / 255.0
  n, side = len(studies), frontal.shape[1]
  return frontal.reshape(n, size, side // size, size, side // size).mean(axis=(2, 4)).reshape(n, -1)


def minilm_model():
  import transformers  # pylint: disable=import-outside-toplevel

  from clinvla_jax.convert import common  # pylint: disable=import-outside-toplevel

  transformers.logging.set_verbosity_error()  # the checkpoint's pooler is unused here, and said to be
  return transformers.BertModel.from_pretrained(common.resolve_path(demo.MINILM), add_pooling_layer=False).eval()


def minilm_features(model, studies: list[dict]) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=import-outside-toplevel

  ids = torch.tensor(np.stack([s["input_ids"] for s in studies]), dtype=torch.long)
  mask = torch.tensor(np.stack([s["attention_mask"] for s in studies]), dtype=torch.long)
  with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
  weights = mask[..., None].float()
  return {"cls": hidden[:, 0].numpy(), "mean": ((hidden * weights).sum(1) / weights.sum(1)).numpy()}


def probe_auc(train_x, train_y, val_x, val_y, strength: float) -> float:
  """Val AUC of a standardised L2 logistic regression fitted on the training rows."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  fit = LogisticRegression(C=strength, max_iter=5000).fit((train_x - mean) / std, train_y)
  return float(roc_auc_score(val_y, fit.predict_proba((val_x - mean) / std)[:, 1]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", default=demo.DEMO_DATA)
  parser.add_argument("--embeddings", default="", help="prefix of a run's <prefix>_train.npz and <prefix>_val.npz")
  args = parser.parse_args(argv)

  train, val = load_split(args.data, "train"), load_split(args.data, "val")
  names = list(source_lib.read_manifest(args.data)["label_names"])
  train_pos = positive_labels(np.stack([s["labels"] for s in train]))
  val_pos = positive_labels(np.stack([s["labels"] for s in val]))
  print(
    f"studies: train {len(train)} ({len({s['patient_id'] for s in train})} patients), "
    f"val {len(val)} ({len({s['patient_id'] for s in val})} patients)"
  )
  print("| finding | train | val |\n|---|---|---|")
  for k, name in enumerate(names):
    print(f"| {name} | {int(train_pos[:, k].sum())} | {int(val_pos[:, k].sum())} |")

  target = names.index(TARGET)
  labelled = train_pos.any(axis=1)  # unlabelled studies are neither positive nor negative
  features = {f"pixels {s}x{s}": (pooled_pixels(train, s), pooled_pixels(val, s)) for s in (8, 16)}
  model = minilm_model()
  text_train, text_val = minilm_features(model, train), minilm_features(model, val)
  features.update({f"MiniLM frozen, {k}": (text_train[k], text_val[k]) for k in text_train})
  if args.embeddings:
    run_train, run_val = (np.load(f"{args.embeddings}_{s}.npz") for s in ("train", "val"))
    for key in ("image_global", "text_global"):
      features[f"run {key}"] = (run_train[key], run_val[key])

  print(f"\n{TARGET} against the rest, val AUC of a probe fitted on {int(labelled.sum())} labelled training studies")
  print("| feature | " + " | ".join(f"C={c}" for c in STRENGTHS) + " |\n" + "|---" * (len(STRENGTHS) + 1) + "|")
  out = {"auc": {}, "p5": {}}
  for name, (x_train, x_val) in features.items():
    aucs = [probe_auc(x_train[labelled], train_pos[labelled, target], x_val, val_pos[:, target], c) for c in STRENGTHS]
    out["auc"][name] = aucs
    print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in aucs) + " |")

  if args.embeddings:
    relevant = metrics.relevance_matrix(val_pos, val_pos)
    scores = run_val["text_global"] @ run_val["image_global"].T
    is_target = val_pos[:, target]
    chance = metrics.chance_precision_per_query(relevant)  # one gallery of the same studies in both directions
    print("\nthe run's P@5 by the query's finding (chance: the share of relevant items)")
    print("| direction | all queries | " + f"{TARGET} queries | other queries |\n|---|---|---|---|")
    for direction, s in (("text->image", scores), ("image->text", scores.T)):
      p = metrics.precision_at_k_per_query(s, relevant, (5,))[:, 0]
      out["p5"][direction] = {"all": p.mean(), TARGET: p[is_target].mean(), "other": p[~is_target].mean()}
      print(
        f"| {direction} | {p.mean():.3f} (chance {chance.mean():.3f}) | {p[is_target].mean():.3f} "
        f"(chance {chance[is_target].mean():.3f}) | {p[~is_target].mean():.3f} (chance {chance[~is_target].mean():.3f}) |"
      )
  return out


if __name__ == "__main__":
  main()
