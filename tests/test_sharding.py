"""The device mesh (8 simulated CPU devices, tests/conftest.py)."""

import jax
import numpy as np
import pytest

from clinvla_jax import sharding

pytestmark = pytest.mark.multidevice


def test_mesh_takes_every_device_with_auto_axes():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_names == sharding.MESH_AXES
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_mesh_on_a_subset_uses_exactly_those_devices():
  devices = jax.devices()[2:6]
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_batch_is_split_over_data_and_fsdp():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  batch = sharding.global_batch(local, mesh, ["x"])
  assert batch["x"].shape == (16, 3)
  # Every device holds 2 of the 16 rows, all columns.
  assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])


@pytest.mark.parametrize(
  "axes, message",
  [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, "must divide the 8 devices"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices"),
  ],
)
def test_bad_meshes_are_clear_errors(axes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(axes)
