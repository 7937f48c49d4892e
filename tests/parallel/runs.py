"""Trainer runs shared by the device tests: one compiled step per configuration, reused.

``run_trainer`` runs ``apts_trainer`` on a 1-D data mesh (or one device), ``run_mesh`` on a 2-D
(data x model) mesh with the parameters sharded tensor-parallel (``"tp"``) or FSDP-style
(``"fsdp"``); ``one_device_float32`` is the single-device reference of the float32 comparisons
with its rounding spread (tests/rounding.py).
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from aptsjax import APTSConfig
from aptsjax import parallel
from tests import rounding
from tests.problems import mlp_loss
from tests.problems import problem

PAPER = {"base": APTSConfig.paper()}   # local trust-region steps, L-SR1 everywhere

SPECS = {
    "tp": {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()},
    "fsdp": {"w1": P("model", None), "b1": P("model"), "w2": P("model", None), "b2": P()},
}


@functools.lru_cache(maxsize=None)
def cached_trainer(num_devices, second_order, **kw):
  """One trainer (one compiled step) per configuration, reused by the rounding probes."""
  return parallel.apts_trainer(mlp_loss, 4, num_devices=num_devices, second_order=second_order,
                               **kw)


@functools.lru_cache(maxsize=None)
def mesh_trainer(layout, data, model, second_order, **kw):
  """One trainer per 2-D configuration: ``data`` x ``model`` devices, parameters laid out as
  ``SPECS[layout]``."""
  return parallel.apts_trainer(mlp_loss, 4, num_devices=data, model_devices=model,
                               param_specs=SPECS[layout], second_order=second_order, **kw)


def run(trainer, iters, dtype, params):
  """``iters`` steps of ``trainer`` on the 512-row problem from ``params`` (default: the
  problem's); the caller's params stay usable (the step donates its inputs)."""
  default_params, batch = problem(dtype, rows=512)
  params = jax.tree.map(jnp.copy, default_params if params is None else params)
  state, sharded = trainer.init(params), trainer.shard_batch(batch)
  for _ in range(iters):
    params, state = trainer.step(params, state, sharded)
  return params, state


def run_trainer(num_devices, second_order, iters, dtype=jnp.float32, params=None, **kw):
  """A 1-D run as host arrays. 128 rows per subdomain: with far fewer rows than parameters per
  block the local curvature is rank-deficient, and float64 rounding differences grow too fast
  for a 10-iteration comparison."""
  params, state = run(cached_trainer(num_devices, second_order, **kw), iters, dtype, params)
  return parallel.numpy_tree(params), parallel.numpy_tree(state)


def run_mesh(layout, data, model, second_order, iters, dtype=jnp.float32, params=None, **kw):
  """A 2-D run, as device arrays (their shardings are part of what the tests check)."""
  return run(mesh_trainer(layout, data, model, second_order, **kw), iters, dtype, params)


def one_device_float32(second_order, iters, params):
  """The single-device float32 run and its probe spread (tests/rounding.py's error model)."""
  def one_device(p):
    p, state = run_trainer(1, second_order, iters, params=p)
    return {"params": p, "loss": state.value, "radius": state.radius}

  reference = one_device(params)
  return reference, rounding.probe_spread(one_device, params, reference)
