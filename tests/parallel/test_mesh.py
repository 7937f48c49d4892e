"""aptsjax.parallel.mesh: the trainer's 1-D and 2-D (data x model) meshes refuse what they cannot
lay out, and every process chooses the mesh's devices alike.

Runs on 2-D meshes equal to the single-device run: tests/parallel/test_devices.py.
"""

import pytest
from jax.sharding import PartitionSpec as P

from aptsjax import parallel
from tests.parallel.runs import SPECS
from tests.problems import mlp_loss
from tests.problems import problem


def test_mesh_configuration_errors():
  params, _ = problem()
  with pytest.raises(ValueError, match="model_devices"):
    parallel.apts_trainer(mlp_loss, 4, model_devices=8)
  with pytest.raises(ValueError, match="num_devices=4 x model_devices=2"):
    parallel.apts_trainer(mlp_loss, 4, num_devices=4, model_devices=2)
  with pytest.raises(ValueError, match="different names"):
    parallel.apts_trainer(mlp_loss, 4, num_devices=2, model_devices=2, model_axis="data")
  bad = parallel.apts_trainer(mlp_loss, 4, num_devices=2, model_devices=2,
                              param_specs={**SPECS["tp"], "w1": P("data", None)})
  with pytest.raises(ValueError, match="only be sharded over"):
    bad.init(params)
  odd = parallel.apts_trainer(mlp_loss, 4, num_devices=1, model_devices=4,
                              param_specs={**SPECS["tp"], "b2": P("model")})
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    odd.init(params)


class FakeDevice:
  def __init__(self, process_index, id):
    self.process_index, self.id = process_index, id

  def __repr__(self):
    return f"d{self.process_index}.{self.id}"


def test_device_choice_takes_the_same_count_from_every_process():
  devices = [FakeDevice(p, 10 * p + i) for p in (1, 0) for i in range(2)]  # process 1 listed first
  assert parallel.default_num_devices(4, devices) == 4
  assert parallel.default_num_devices(2, devices) == 2
  assert parallel.default_num_devices(6, devices) == 2   # 3 per process would not fit
  assert [(d.process_index, d.id) for d in parallel.mesh_devices(2, devices)] == [(0, 0), (1, 10)]
  assert [(d.process_index, d.id) for d in parallel.mesh_devices(4, devices)] == [
      (0, 0), (0, 1), (1, 10), (1, 11)]
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    parallel.default_num_devices(3, devices)
  with pytest.raises(ValueError, match="not a multiple of the 2 processes"):
    parallel.mesh_devices(3, devices)
  with pytest.raises(ValueError, match="needs 3 devices per process"):
    parallel.mesh_devices(6, devices)
