r"""A figure of training augmentation: demo views as stored, and as three epochs of training see them.

Each row is one study of the bundled demo set (its current frontal view); the columns are the stored view and
its augmented versions at epochs 0, 1 and 2 (`configs/base.py`'s ranges, ALTA's), whole views without masking.
Seconds on a CPU.

  python benchmarks/augment_figure.py --out=docs/augment_examples.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from clinvla_jax.data import DEMO_DIR  # pylint: disable=wrong-import-position
from clinvla_jax.data import augment  # pylint: disable=wrong-import-position
from clinvla_jax.data import records  # pylint: disable=wrong-import-position
from clinvla_jax.data import source as source_lib  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="docs/augment_examples.png")
  parser.add_argument("--studies", default="0,7,19", help="record indices of the demo set")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  src = source_lib.ArrayRecordSource(source_lib.list_shards(str(DEMO_DIR / "covid_cxr")))
  studies = [int(i) for i in args.studies.split(",")]
  spec = augment.AugmentSpec()
  epochs = (0, 1, 2)
  fig, axes = plt.subplots(len(studies), 1 + len(epochs), figsize=(2.2 * (1 + len(epochs)), 2.3 * len(studies)))
  for row, index in enumerate(studies):
    view = records.decode_record(src[index])["images"][0]
    shown = [(view, f"record {index}: stored")]
    for epoch in epochs:
      drawn = augment.draw(spec, seed=args.seed, epoch=epoch, index=index)
      p = {k: v[0] for k, v in drawn.items()}
      title = f"epoch {epoch}: {p['angle']:+.0f} deg, x{p['scale']:.2f}\nb {p['brightness']:.2f}, c {p['contrast']:.2f}"
      shown.append((augment.augment_image(view, p), title))
    for col, (image, title) in enumerate(shown):
      ax = axes[row, col]
      ax.imshow(image, cmap="gray", vmin=0, vmax=255)
      ax.set_title(title, fontsize=7)
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(args.out, dpi=72)
  print(f"wrote {args.out} ({len(studies)} studies, epochs {epochs}); {augment.describe(spec)}")


if __name__ == "__main__":
  main()
