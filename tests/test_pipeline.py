"""Tests for the ArrayRecord source and the Grain pipeline (clinvla_jax.data)."""

import json
import logging
import os
import pickle
import sys

from absl import flags
from array_record.python import array_record_module
import numpy as np
import pytest

from clinvla_jax.data import masking
from clinvla_jax.data import pipeline
from clinvla_jax.data import schema
from clinvla_jax.data import records
from clinvla_jax.data import source as source_lib

NUM_LABELS = 3
K75 = records.num_kept_patches(0.75)


def setup_module():
  # Grain workers read absl flags; pytest does not parse them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


def _example(index):
  """A study whose every field is a function of its index."""
  rng = np.random.default_rng(index)
  views = rng.integers(0, 256, (schema.NUM_VIEWS, schema.IMAGE_SIZE, schema.IMAGE_SIZE), dtype=np.uint8)
  view_valid = np.array([True, index % 2 == 0, index % 3 == 0, False])
  views[~view_valid] = 0
  ids = (np.arange(schema.MAX_TEXT_LEN) + index).astype(np.int32)
  return {
    "images": views,
    "view_valid": view_valid,
    "input_ids": ids,
    "attention_mask": (np.arange(schema.MAX_TEXT_LEN) < 10 + index % 7).astype(np.int32),
    "text": f"report {index}",
    "labels": np.array([index % 2, -1.0, np.nan], np.float32),
    "patient_id": f"p{index}",
    "study_id": f"s{index}",
    "split": "train",
  }


def _write_shards(folder, sizes, corrupt=(), manifest=True):
  """Writes shards of synthetic records; returns their paths.

  Args:
    folder: output folder (created).
    sizes: records per shard; global indices run on across shards.
    corrupt: global indices written as undecodable bytes.
    manifest: also write a manifest.json naming the shards and labels.
  """
  os.makedirs(folder, exist_ok=True)
  paths, index = [], 0
  for shard, size in enumerate(sizes):
    path = os.path.join(folder, f"data-{shard:05d}-of-{len(sizes):05d}.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for _ in range(size):
      if index in corrupt:
        writer.write(b"CVR1 definitely not a record")
      else:
        writer.write(records.encode_record(_example(index)))
      index += 1
    writer.close()
    paths.append(path)
  if manifest:
    with open(os.path.join(folder, "manifest.json"), "w") as f:
      json.dump({"shards": [os.path.basename(p) for p in paths], "label_names": ["a", "b", "c"]}, f)
  return paths


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("records"))
  _write_shards(folder, [13, 11, 16])  # 40 studies over 3 shards
  return folder


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _train(data_dir, **kw):
  args = dict(global_batch_size=8, seed=3, shard_index=0, shard_count=1)
  args.update(kw)
  return pipeline.make_train_loader(data_dir, **args)


def _eval(data_dir, **kw):
  args = dict(global_batch_size=8, shard_index=0, shard_count=1)
  args.update(kw)
  return pipeline.make_eval_loader(data_dir, **args)


# --- source -------------------------------------------------------------------


def test_source_reads_every_record_across_shards(data_dir):
  src = source_lib.ArrayRecordSource(data_dir)
  assert len(src) == 40 and src.shard_sizes == (13, 11, 16)
  for index in (0, 12, 13, 23, 24, 39, -1):
    rec = records.decode_record(src[index], with_images=False)
    assert rec["study_id"] == f"s{index % 40}"
  with pytest.raises(IndexError):
    src[40]  # pylint: disable=pointless-statement
  assert [records.decode_record(r, with_images=False)["study_id"] for r in src.read_range(11, 15)] == [
    "s11",
    "s12",
    "s13",
    "s14",
  ]


def test_source_lists_folder_glob_and_files(data_dir, tmp_path):
  shards = source_lib.list_shards(data_dir)
  assert [os.path.basename(p) for p in shards] == [
    "data-00000-of-00003.array_record",
    "data-00001-of-00003.array_record",
    "data-00002-of-00003.array_record",
  ]
  assert source_lib.list_shards(os.path.join(data_dir, "*.array_record")) == shards
  assert source_lib.list_shards(shards[::-1]) == shards[::-1]
  # Without a manifest the folder is globbed.
  bare = _write_shards(str(tmp_path / "bare"), [2, 1], manifest=False)
  assert source_lib.list_shards(str(tmp_path / "bare")) == bare
  with pytest.raises(FileNotFoundError):
    source_lib.list_shards(str(tmp_path / "nothing-here"))


def test_source_pickles_without_open_readers(data_dir):
  src = source_lib.ArrayRecordSource(data_dir)
  first = src[20]
  copy = pickle.loads(pickle.dumps(src))
  assert copy[20] == first and len(copy) == 40
  assert repr(copy) == repr(src)


# --- training loader ----------------------------------------------------------


def test_train_batch_matches_contract(data_dir):
  loader = _train(data_dir)
  assert loader.info.batch_size == 8 and loader.info.num_kept == K75 == 49
  batch = next(iter(loader))
  assert tuple(batch) == records.BATCH_KEYS
  p = schema.PATCH_SIZE**2
  expected = {
    "patches": ((8, schema.NUM_VIEWS, K75, p), np.uint8),
    "patch_idx": ((8, schema.NUM_VIEWS, K75), np.int32),
    "view_valid": ((8, schema.NUM_VIEWS), np.bool_),
    "input_ids": ((8, schema.MAX_TEXT_LEN), np.int32),
    "attention_mask": ((8, schema.MAX_TEXT_LEN), np.int32),
    "labels": ((8, NUM_LABELS), np.float32),
    "example_valid": ((8,), np.bool_),
    "record_index": ((8,), np.int64),
  }
  for key, (shape, dtype) in expected.items():
    assert type(batch[key]) is np.ndarray, key  # pylint: disable=unidiomatic-typecheck
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert batch["example_valid"].all()


def test_train_rows_hold_the_masked_study(data_dir):
  batch = next(iter(_train(data_dir, seed=5)))
  for row, index in enumerate(batch["record_index"]):
    ex = _example(int(index))
    patches, idx = masking.mask_views(ex["images"], K75, seed=5, epoch=0, index=int(index))
    np.testing.assert_array_equal(batch["patch_idx"][row], idx)
    np.testing.assert_array_equal(batch["patches"][row], patches)
    np.testing.assert_array_equal(batch["view_valid"][row], ex["view_valid"])
    np.testing.assert_array_equal(batch["input_ids"][row], ex["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"][row], ex["attention_mask"])
    np.testing.assert_array_equal(batch["labels"][row], ex["labels"])


def test_train_epochs_are_permutations_with_fresh_masks(data_dir):
  loader = _train(data_dir, num_epochs=2)
  batches = list(loader)
  assert len(batches) == 10  # 2 epochs x 40 studies / 8
  order = np.concatenate([b["record_index"] for b in batches])
  first, second = order[:40], order[40:]
  assert sorted(first) == list(range(40)) == sorted(second)
  assert not np.array_equal(first, second)
  assert not np.array_equal(first, np.arange(40))
  idx = np.concatenate([b["patch_idx"] for b in batches])
  rows = {e: dict(zip(o, idx[s : s + 40])) for e, (s, o) in enumerate([(0, first), (40, second)])}
  changed = [not np.array_equal(rows[0][i], rows[1][i]) for i in range(40)]
  assert all(changed)
  # Same seed, same stream; another seed, another order.
  again = np.concatenate([b["record_index"] for b in _train(data_dir, num_epochs=1)])
  np.testing.assert_array_equal(again, first)
  other = np.concatenate([b["record_index"] for b in _train(data_dir, num_epochs=1, seed=4)])
  assert not np.array_equal(other, first)


def test_train_drops_remainder(data_dir):
  loader = _train(data_dir, global_batch_size=12, num_epochs=1)
  batches = list(loader)
  assert [len(b["record_index"]) for b in batches] == [12, 12, 12]
  assert loader.info.batches_per_epoch == 3


def test_train_state_restore_gives_identical_batches(data_dir):
  loader = _train(data_dir)
  it = iter(loader)
  _take(it, 7)  # runs into the second epoch
  state = it.get_state()
  expected = _take(it, 4)
  restored = loader.iterator(state)
  _assert_batches_equal(_take(restored, 4), expected)
  # A loader built anew (as after a restart) accepts the state too.
  fresh = _train(data_dir).iterator()
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)


@pytest.mark.slow
def test_train_state_restore_with_a_worker(data_dir):
  loader = _train(data_dir, worker_count=1)
  it = iter(loader)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  restored = loader.iterator(state)
  _assert_batches_equal(_take(restored, 3), expected)
  # Workers do the same work as the main process would.
  in_process = iter(_train(data_dir))
  _assert_batches_equal(_take(in_process, 6)[3:], expected)


@pytest.mark.slow
def test_eval_with_workers_reads_each_study_once(data_dir):
  loader = _eval(data_dir, worker_count=2, global_batch_size=16)
  batches = list(loader)
  # 40 studies padded to a multiple of 16 rows, whatever the worker count.
  assert len(batches) == loader.info.batches_per_epoch == 3
  assert all(len(b["record_index"]) == 16 for b in batches)
  ids = np.concatenate([b["record_index"] for b in batches])
  np.testing.assert_array_equal(ids[:40], np.arange(40))
  assert (ids[40:] < 0).all()
  _assert_batches_equal(list(loader), batches)
  _assert_batches_equal(list(_eval(data_dir, global_batch_size=16)), batches)


def test_processes_get_disjoint_covering_shards(data_dir):
  seen = []
  for shard in range(3):
    loader = _train(data_dir, global_batch_size=6, shard_index=shard, shard_count=3, num_epochs=1)
    assert loader.info.batch_size == 2
    assert loader.info.examples_per_epoch == 13
    seen.append(np.concatenate([b["record_index"] for b in loader]))
  union = np.concatenate(seen)
  assert len(union) == 36 == len(set(union.tolist()))  # 3 x 6 full batches
  # One epoch is 39 studies (40 rounded down to 3 processes); each process
  # read 13 of them and dropped its last incomplete batch.
  everything = set()
  for shard in range(3):
    loader = _eval(data_dir, global_batch_size=6, shard_index=shard, shard_count=3)
    ids = np.concatenate([b["record_index"] for b in loader])
    everything.update(ids[ids >= 0].tolist())
    assert len(ids[ids >= 0]) == len(set(ids[ids >= 0].tolist()))
  assert everything == set(range(40))


def test_shard_arguments_validated(data_dir):
  with pytest.raises(ValueError):
    _train(data_dir, global_batch_size=7, shard_count=2)
  with pytest.raises(ValueError):
    pipeline.make_train_loader(data_dir, global_batch_size=8, seed=0, shard_index=1)
  # Default: this JAX process of all of them (one here).
  loader = pipeline.make_train_loader(data_dir, global_batch_size=8, seed=0)
  assert (loader.info.shard_index, loader.info.shard_count) == (0, 1)


# --- evaluation loader --------------------------------------------------------


def test_eval_fixed_order_unmasked_and_padded(data_dir):
  loader = _eval(data_dir, global_batch_size=16)
  batches = list(loader)
  assert len(batches) == loader.info.batches_per_epoch == 3
  assert all(b["patches"].shape == (16, schema.NUM_VIEWS, schema.NUM_PATCHES, schema.PATCH_SIZE**2) for b in batches)
  order = np.concatenate([b["record_index"] for b in batches])
  np.testing.assert_array_equal(order[:40], np.arange(40))
  np.testing.assert_array_equal(order[40:], -1)
  last = batches[-1]
  np.testing.assert_array_equal(last["example_valid"], np.arange(16) < 8)
  assert not last["view_valid"][8:].any()
  assert np.isnan(last["labels"][8:]).all()
  np.testing.assert_array_equal(
    batches[0]["patch_idx"],
    np.broadcast_to(np.arange(schema.NUM_PATCHES), (16, schema.NUM_VIEWS, schema.NUM_PATCHES)),
  )
  np.testing.assert_array_equal(masking.unpatchify(batches[1]["patches"][3]), _example(19)["images"])
  # A second pass is identical.
  _assert_batches_equal(list(loader), batches)


def test_eval_exact_multiple_needs_no_padding(data_dir):
  batches = list(_eval(data_dir, global_batch_size=10))
  assert len(batches) == 4
  assert all(b["example_valid"].all() for b in batches)


# --- undecodable records ------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("corrupt"))
  _write_shards(folder, [10, 10], corrupt={3, 14})
  return folder


def test_train_skips_and_counts_undecodable(corrupt_dir, caplog):
  loader = _train(corrupt_dir, global_batch_size=6, num_epochs=1, shuffle=False)
  with caplog.at_level(logging.WARNING):
    it = iter(loader)
    batches = list(it)
  ids = np.concatenate([b["record_index"] for b in batches])
  assert len(ids) == 18
  np.testing.assert_array_equal(ids, [i for i in range(20) if i not in (3, 14)])
  assert it.num_skipped == 2
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "record 3" in messages and "record 14" in messages


def test_skip_count_survives_state_restore(corrupt_dir):
  loader = _train(corrupt_dir, global_batch_size=4, shuffle=False)
  it = iter(loader)
  _take(it, 2)  # records 0-8 read, record 3 skipped
  assert it.num_skipped == 1
  restored = loader.iterator(it.get_state())
  assert restored.num_skipped == 1
  _take(restored, 2)  # reaches record 14
  assert restored.num_skipped == 2


def test_state_restore_mid_chunk_with_undecodable(corrupt_dir):
  # Batches of 4 from chunks of 4 that lost records 3 and 14: most batches
  # straddle two chunks, so most states point into a partly used chunk.
  loader = _train(corrupt_dir, global_batch_size=4, seed=1)
  it = iter(loader)
  states, batches = [], []
  for _ in range(12):
    states.append(it.get_state())
    batches.append(next(it))
  assert it.num_skipped >= 2
  for k in (1, 2, 5, 9):
    restored = loader.iterator(states[k])
    _assert_batches_equal(_take(restored, 12 - k), batches[k:])
  ids = np.concatenate([b["record_index"] for b in batches[:5]])
  assert len(set(ids.tolist())) == 18 == len(ids) - 2  # epoch 0: 18 studies, then epoch 1


def test_old_iterator_state_is_refused(data_dir):
  state = json.loads(iter(_train(data_dir)).get_state().decode())
  state.pop("clinvla_stream")
  with pytest.raises(ValueError, match="earlier input pipeline"):
    _train(data_dir).iterator(json.dumps(state).encode())


def test_eval_selected_view_slots(data_dir):
  full = next(iter(_eval(data_dir)))
  for slots in ((0,), (2, 0)):
    batch = next(iter(_eval(data_dir, view_slots=slots)))
    assert batch["patches"].shape == (8, len(slots), schema.NUM_PATCHES, schema.PATCH_SIZE**2)
    for key in ("patches", "patch_idx", "view_valid"):
      np.testing.assert_array_equal(batch[key], full[key][:, list(slots)], err_msg=key)
    np.testing.assert_array_equal(batch["input_ids"], full["input_ids"])
  with pytest.raises(ValueError, match="view_slots"):
    _eval(data_dir, view_slots=(4,))


@pytest.mark.parametrize("codec", ["png", "raw"])
def test_older_codecs_give_the_same_batches(tmp_path, codec):
  # Folders written before the patch-major codec keep working, more slowly.
  folders = {}
  for name in (codec, records.DEFAULT_IMAGE_CODEC):
    folders[name] = str(tmp_path / name)
    os.makedirs(folders[name])
    path = os.path.join(folders[name], "data-00000-of-00001.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for index in range(16):
      writer.write(records.encode_record(_example(index), image_codec=name))
    writer.close()
  for make in (_train, _eval):
    old = next(iter(make(folders[codec], num_labels=NUM_LABELS)))
    new = next(iter(make(folders[records.DEFAULT_IMAGE_CODEC], num_labels=NUM_LABELS)))
    _assert_batches_equal([old], [new])


def test_eval_turns_undecodable_into_padding(corrupt_dir):
  it = iter(_eval(corrupt_dir, global_batch_size=8))
  batches = list(it)
  ids = np.concatenate([b["record_index"] for b in batches])
  valid = np.concatenate([b["example_valid"] for b in batches])
  assert len(ids) == 24
  assert sorted(ids[valid].tolist()) == [i for i in range(20) if i not in (3, 14)]
  assert ids[3] == -1 and ids[14] == -1 and not valid[3]
  assert it.num_skipped == 2
