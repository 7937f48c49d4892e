"""The trainer's warnings about silent costs (issue 22): a batch of new shapes (the step is
compiled again) and a default ``num_devices`` that leaves devices idle."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from aptsjax import parallel


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def problem(rows):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(rows, 3)).astype(np.float32)
  params = {"w": np.zeros(3, np.float32), "b": np.zeros((), np.float32)}
  return params, (x, x @ np.arange(1.0, 4.0, dtype=np.float32))


def user_warnings(fn):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = fn()
  return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("num_devices", [1, 2])
def test_a_new_batch_shape_warns_once(num_devices):
  trainer = parallel.apts_trainer(loss_fn, 2, num_devices=num_devices, second_order=False,
                                  local_steps=1)
  params, _ = problem(64)
  state = trainer.init(params)
  seen = []
  for rows in (64, 64, 48, 32, 48):
    batch = trainer.shard_batch(problem(rows)[1])
    (params, state), messages = user_warnings(lambda: trainer.step(params, state, batch))
    seen.append(messages)
  assert seen[0] == seen[1] == [] and seen[3] == seen[4] == [], seen  # once, not at the start
  assert len(seen[2]) == 1, seen
  message = seen[2][0]
  assert message.startswith("trainer.step got a batch of shapes (float32[48,3], float32[48]) "
                            "after (float32[64,3], float32[64])"), message
  assert "compiled again" in message and "aptsjax.data.iterate_minibatches" in message
  assert "aptsjax.data.trim_rows" in message and "pad the last partial batch" in message
  assert int(state.iteration) == 5


def test_a_default_num_devices_leaving_devices_idle_warns():
  trainer, messages = user_warnings(lambda: parallel.apts_trainer(loss_fn, 6))
  assert trainer.mesh.devices.size == 3
  assert messages == [
      "num_subdomains=6 on 4 available devices: the trainer uses num_devices=3 (the most that "
      "divide N) and leaves 1 idle. To use all 4, make num_subdomains a multiple of 4 (e.g. 8); "
      "to keep this layout, pass num_devices=3, which also silences this warning."]
  _, messages = user_warnings(lambda: parallel.apts_trainer(loss_fn, 3, model_devices=2))
  assert len(messages) == 1 and "on 2 available replicas of model_devices=2" in messages[0]
  assert "uses num_devices=1" in messages[0]


@pytest.mark.parametrize("kwargs", [dict(num_subdomains=8), dict(num_subdomains=4),
                                    dict(num_subdomains=6, num_devices=3),
                                    dict(num_subdomains=2, num_devices=2)])
def test_no_warning_when_every_device_is_used_or_d_is_given(kwargs):
  _, messages = user_warnings(lambda: parallel.apts_trainer(loss_fn, **kwargs))
  assert messages == []
