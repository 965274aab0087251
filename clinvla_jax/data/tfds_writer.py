"""The TFDS copy of a converter's output: the same studies again as a TFDS builder directory in the same folder.

Our own shards stay what the pipeline reads; the copy is for other tools (``tfds.builder_from_directory``). The
feature spec and the example conversion are ``clinvla_jax.data.tfds_format``'s; this module writes the files.
Needs ``tensorflow-datasets`` (the ``tfds`` extra), imported only when a copy is written.
"""

import os
from typing import Any, Mapping, Sequence

from array_record.python import array_record_module

from clinvla_jax.data import schema
from clinvla_jax.data import records
from clinvla_jax.data import source
from clinvla_jax.data import tfds_format
from clinvla_jax.data.studies import ConversionError


# Source, citation and licence per dataset, for the TFDS dataset info.
SOURCES = {
  "covid_cxr": dict(
    homepage="https://github.com/ieee8023/covid-chestxray-dataset",
    citation=(
      "@article{cohen2020covidProspective, title={COVID-19 Image Data Collection: "
      "Prospective Predictions Are the Future}, author={Cohen, Joseph Paul and "
      "Morrison, Paul and Dao, Lan and Roth, Karsten and Duong, Tim Q and Ghassemi, "
      "Marzyeh}, journal={arXiv 2006.11988}, year={2020}}"
    ),
    licence="Per image, see the source metadata.csv (licence column); metadata CC BY-NC-SA 4.0.",
  ),
  "mimic_cxr": dict(
    homepage="https://physionet.org/content/mimic-cxr-jpg/",
    citation=(
      "@article{johnson2019mimicjpg, title={MIMIC-CXR-JPG, a large publicly available "
      "database of labeled chest radiographs}, author={Johnson, Alistair E W and "
      "others}, journal={arXiv 1901.07042}, year={2019}}"
    ),
    licence="PhysioNet Credentialed Health Data License 1.5.0 (credentialed access only).",
  ),
  "chexpert": dict(
    homepage="https://stanfordmlgroup.github.io/competitions/chexpert/",
    citation=(
      "@inproceedings{irvin2019chexpert, title={CheXpert: A Large Chest Radiograph "
      "Dataset with Uncertainty Labels and Expert Comparison}, author={Irvin, Jeremy "
      "and others}, booktitle={AAAI}, year={2019}}"
    ),
    licence="Stanford University School of Medicine CheXpert Dataset Research Use Agreement.",
  ),
  "iu_xray": dict(
    homepage="https://openi.nlm.nih.gov/",
    citation=(
      "@article{demner2016preparing, title={Preparing a collection of radiology "
      "examinations for distribution and retrieval}, author={Demner-Fushman, Dina "
      "and others}, journal={JAMIA}, volume={23}, number={2}, year={2016}}"
    ),
    licence="CC BY-NC-ND 4.0 (Indiana University / NLM Open-I).",
  ),
  "rsna_pneumonia": dict(
    homepage="https://www.kaggle.com/c/rsna-pneumonia-detection-challenge",
    citation=(
      "@article{shih2019augmenting, title={Augmenting the National Institutes of "
      "Health Chest Radiograph Dataset with Expert Annotations of Possible "
      "Pneumonia}, author={Shih, George and others}, journal={Radiology: "
      "Artificial Intelligence}, year={2019}}"
    ),
    licence="RSNA Pneumonia Detection Challenge data terms (non-commercial research).",
  ),
}


def write_tfds(output: str, manifest: dict[str, Any]) -> dict[str, Any]:
  """Writes the converted records again as a TFDS builder directory in ``output``."""
  try:
    import tensorflow_datasets  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConversionError(
      "writing the TFDS copy needs tensorflow-datasets (pip install -e '.[tfds]'), or pass --notfds"
    ) from e
  dataset = manifest["dataset"]
  splits = {s: [os.path.join(output, f) for f in info["shards"]] for s, info in manifest["splits"].items()}
  if not any(splits.values()):
    return {
      "name": dataset,
      "records_by_split": {},
      "files": [],
      "note": "no records were written, so there is no TFDS dataset",
    }
  source = SOURCES.get(dataset, {})
  counts = write_builder_dir(
    output,
    dataset=dataset,
    splits=splits,
    label_names=manifest["label_names"],
    description=(
      f"{dataset} converted by data_prep.{dataset} for ClinVLA: one example per "
      f"study, views {', '.join(schema.VIEW_NAMES)}; labels "
      f"{', '.join(manifest['label_names'])}."
    ),
    homepage=source.get("homepage", ""),
    citation=source.get("citation", ""),
    licence=source.get("licence", ""),
  )
  return {
    "name": dataset,
    "records_by_split": counts,
    "files": sorted(os.path.basename(p) for s in counts for p in tfds_format.split_files(output, s)),
  }


def write_builder_dir(
  folder: str,
  *,
  dataset: str,
  splits: Mapping[str, Sequence[str]],
  label_names: Sequence[str],
  description: str = "",
  homepage: str = "",
  citation: str = "",
  licence: str = "",
) -> dict[str, int]:
  """Writes TFDS shards and metadata for the records in ``splits``.

  Args:
    folder: the converter output folder (also the builder directory).
    dataset: TFDS dataset name (file names start with it).
    splits: split name -> our shard paths, in order; one TFDS shard each.
    label_names: names of the ``labels`` entries.
    description, homepage, citation, licence: for dataset_info.json / LICENSE.

  Returns:
    Records written per split.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  feats = tfds_format.features()
  split_infos, counts = [], {}
  for split, shards in sorted(splits.items()):
    template = tfds.core.ShardedFileTemplate(
      data_dir=folder,
      template=tfds_format.TEMPLATE,
      dataset_name=dataset,
      split=split,
      filetype_suffix=tfds_format.FILE_FORMAT,
    )
    lengths, num_bytes = [], 0
    for k, shard in enumerate(shards):
      path = os.fspath(template.sharded_filepath(shard_index=k, num_shards=len(shards)))
      tmp = f"{path}.tmp-{os.getpid()}"
      writer = array_record_module.ArrayRecordWriter(tmp, source.WRITER_OPTIONS)
      n = 0
      for data in source.read_all(shard):
        writer.write(feats.serialize_example(tfds_format.to_example(records.decode_record(data))))
        n += 1
      writer.close()
      os.replace(tmp, path)
      lengths.append(n)
      num_bytes += os.path.getsize(path)
    split_infos.append(
      tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes, filename_template=template)
    )
    counts[split] = sum(lengths)
  metadata = tfds.core.MetadataDict(label_names=list(label_names), view_names=list(schema.VIEW_NAMES))
  # check_data would read the files back through tf.data (TensorFlow).
  tfds.folder_dataset.write_metadata(
    data_dir=folder,
    features=feats,
    split_infos=split_infos,
    filename_template=tfds_format.TEMPLATE,
    check_data=False,
    description=description or dataset,
    homepage=homepage or None,
    citation=citation or None,
    license=licence or None,
    metadata=metadata,
  )
  return counts
