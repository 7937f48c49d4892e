"""The trainer with ``has_aux=True``: every subdomain's aux in ``metrics``, the same on one
device, four devices and a 2 x 2 data x model mesh (the step's output specs place the aux the
first update adds)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aptsjax
from tests.optim.test_aux import loss_with_aux
from tests.problems import problem


@pytest.mark.parametrize("devices, model_devices", [
    (1, 1), pytest.param(4, 1, marks=pytest.mark.slow), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_trainer_metrics_hold_each_subdomains_aux(devices, model_devices):
  params, batch = problem()
  trainer = aptsjax.apts_trainer(loss_with_aux, 4, num_devices=devices,
                                 model_devices=model_devices, has_aux=True)
  params = jax.tree.map(jnp.copy, params)
  state = trainer.init(params)
  sharded = trainer.shard_batch(tuple(np.asarray(a) for a in batch))
  for _ in range(2):
    params, state = trainer.step(params, state, sharded)
  metrics = aptsjax.parallel.numpy_tree(trainer.metrics(state))
  host = aptsjax.parallel.numpy_tree(params)
  x, y = (np.asarray(a) for a in batch)
  want = [float(loss_with_aux(host, (x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]))[1]["mae"])
          for i in range(4)]
  np.testing.assert_allclose(metrics["aux"]["mae"], want, rtol=1e-5)
  assert metrics["aux"]["rows"].tolist() == [16] * 4


def test_trainer_without_aux_has_no_aux_metric():
  params, batch = problem()
  trainer = aptsjax.apts_trainer(lambda p, b: loss_with_aux(p, b)[0], 4, num_devices=1)
  state = trainer.init(jax.tree.map(jnp.copy, params))
  assert "aux" not in trainer.metrics(state)
