"""What one exchange of each method all-reduces, read off its program compiled for W devices.

Each method's exchange is compiled (never run) under ``jax.shard_map`` on a mesh axis "data"
of W simulated host devices, one worker per device, the stream's rows sharded over the axis:

* DDP-Adam: the gradient of ``pmean(loss)`` on the device's b rows, then Adam (the gradient's
  all-reduce: n floats; by construction n).
* DiLoCo: the device's H inner steps (``methods.inner_round``) from theta cast to varying over
  the axis (else each inner gradient would be all-reduced), ``pmean`` of theta_i, the outer step
  (by construction n floats).
* APTS: ``aptsjax.parallel.apts_trainer(task.loss_fn, W, num_devices=W)``'s step, the library's
  defaults (``aptsjax.apts(..., axis_name="data")`` under ``jax.shard_map``) on the stream of H
  minibatches (one minibatch without ``aptsjax.data.stream``).

The count is ``benchmarks.communication.communication.hlo_stats``: the elements of every
all-reduce times its runs per call, a scalar counting as one float, an all-reduce inside a
data-dependent loop (trips unknown) as none (the count flags it: ``in_local_loop``).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import aptsjax
from benchmarks.common import models
from benchmarks.communication.communication import abstract, hlo_stats
from benchmarks.efficiency import methods, streams
from benchmarks.efficiency.task import Task

AXIS = "data"
PyTree = Any
Row = dict[str, Any]


def data_mesh(workers: int) -> jax.sharding.Mesh:
  """A 1-D mesh "data" of the first W devices."""
  if jax.device_count() < workers:
    raise ValueError(f"W={workers} needs {workers} devices, {jax.device_count()} exist: set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count before jax starts")
  return jax.make_mesh((workers,), (AXIS,), devices=jax.devices()[:workers])


def placed(tree: PyTree, mesh: jax.sharding.Mesh, spec: P) -> PyTree:
  """ShapeDtypeStructs of ``tree`` (arrays or structs), every leaf with ``spec`` on ``mesh``."""
  sharding = NamedSharding(mesh, spec)
  return abstract(tree, jax.tree.map(lambda _: sharding, tree))


def example_minibatches(task: Task, batch: int, period: int) -> PyTree:
  """H global minibatches of the task's rows (cycled), leaves (H, B, ...): shapes for lowering."""
  rows = np.arange(period * batch) % task.rows(task.train)
  return streams.take(task.train, rows.reshape(period, batch))


def ddp_program(task: Task, workers: int, batch: int) -> Any:
  """DDP-Adam's step compiled on W devices (one b-row minibatch each)."""
  mesh, tx = data_mesh(workers), optax.adam(1e-3)

  def local(params: PyTree, opt: Any, shard: Any) -> tuple[PyTree, Any]:
    grads = jax.grad(lambda p: jax.lax.pmean(task.loss_fn(p, shard), AXIS))(params)
    return methods.adam_step(tx, params, opt, grads)

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                               out_specs=(P(), P())))
  params = jax.eval_shape(lambda: task.init(0))
  rows = jax.tree.map(lambda x: x[0], example_minibatches(task, batch, 1))
  return step.lower(placed(params, mesh, P()), placed(jax.eval_shape(tx.init, params), mesh, P()),
                    placed(rows, mesh, P(AXIS))).compile()


def diloco_program(task: Task, workers: int, batch: int, period: int) -> Any:
  """DiLoCo's round compiled on W devices (H inner steps on b-row minibatches each)."""
  mesh = data_mesh(workers)
  inner, outer = methods.diloco_optimizers(1e-3, 0.7)
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)

  def local(theta: PyTree, outer_opt: Any, inner_opt: Any, shards: Any
            ) -> tuple[PyTree, Any, Any]:
    start = jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to="varying"), theta)  # own gradients
    theta_i, opt = methods.inner_round(task, inner, start, first(inner_opt), first(shards))
    theta, outer_opt = methods.outer_step(outer, theta, outer_opt, jax.lax.pmean(theta_i, AXIS))
    return theta, outer_opt, jax.tree.map(lambda x: x[None], opt)

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                               out_specs=(P(), P(), P(AXIS))))
  params = jax.eval_shape(lambda: task.init(0))
  inner_opt = jax.eval_shape(lambda p: jax.vmap(lambda _: inner.init(p))(np.arange(workers)),
                             params)
  shards = streams.worker_view(example_minibatches(task, batch, period), workers)
  return step.lower(placed(params, mesh, P()),
                    placed(jax.eval_shape(outer.init, params), mesh, P()),
                    placed(inner_opt, mesh, P(AXIS)), placed(shards, mesh, P(AXIS))).compile()


def apts_program(task: Task, workers: int, batch: int, period: int) -> Any:
  """APTS's update compiled on W devices by ``aptsjax.parallel.apts_trainer`` (defaults)."""
  trainer = aptsjax.parallel.apts_trainer(task.loss_fn, workers, num_devices=workers)
  params = jax.eval_shape(lambda: task.init(0))
  state = jax.eval_shape(trainer.init, params)
  state_sh = jax.tree.map(lambda s: NamedSharding(trainer.mesh, s),
                          aptsjax.state_specs(state, AXIS))
  rows = methods.apts_batch(example_minibatches(task, batch, period))
  return trainer.lower(placed(params, trainer.mesh, P()), abstract(state, state_sh),
                       placed(rows, trainer.mesh, P(AXIS))).compile()


def constructed(method: str, n: int) -> int | None:
  """All-reduced floats per exchange by construction: n for DDP-Adam (the gradient) and DiLoCo
  (the pseudo-gradient); None for APTS (read off its program only)."""
  return n if method in (methods.DDP_ADAM, methods.DILOCO) else None


def exchange_stats(task: Task, method: str, workers: int, batch: int, period: int) -> Row:
  """Compiles one exchange of ``method`` on W devices and reads its all-reduces.

  Args:
    task: the task.
    method: ``methods.DDP_ADAM``, ``DILOCO`` or ``APTS``.
    workers: W.
    batch: B, rows per global minibatch.
    period: H (ignored for DDP-Adam).

  Returns:
    ``hlo_stats``' row (floats_per_iter, calls_per_iter, in_loop, in_local_loop, ...) with the
    method, W, H, the constructed count and the compile time.
  """
  start = time.perf_counter()
  if method == methods.DDP_ADAM:
    compiled, period = ddp_program(task, workers, batch), 1
  elif method == methods.DILOCO:
    compiled = diloco_program(task, workers, batch, period)
  else:
    compiled = apts_program(task, workers, batch, period)
  n = models.count_params(jax.eval_shape(lambda: task.init(0)))
  return {"method": method, "W": workers, "H": period, **hlo_stats(compiled, n),
          "constructed": constructed(method, n), "compile_s": time.perf_counter() - start}
