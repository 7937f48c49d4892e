"""DDP-Adam, DiLoCo and APTS on W simulated workers of one device, one jitted exchange each.

A ``Method`` reads the stream H global minibatches at a time (leaves (H, B, ...), worker i's
rows of minibatch h at ``[h, i b:(i + 1) b]``) and does what the W workers do between two
exchanges, then the exchange:

* DDP-Adam (H = 1): the gradient of the global minibatch (with equal b, the mean of the workers'
  gradients, what the all-reduce forms), then the same Adam step on every worker.
* DiLoCo (Douillard et al., 2023): every worker takes H inner Adam steps from the global
  parameters theta on its own minibatches (its Adam state persists across rounds; vmapped over
  the workers), then delta = theta - mean_i theta_i (the all-reduce) and the outer Nesterov SGD
  step theta <- theta - outer_lr nesterov(delta).
* APTS: one update of ``aptsjax.apts(task.loss_fn, num_subdomains=W)`` with the library's
  defaults on the H minibatches (``aptsjax.data.stream``), subdomain i = worker i.

The inner pieces (``adam_step``, ``inner_round``, ``outer_step``) are shared with the programs
that the communication is read off (``benchmarks.efficiency.programs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aptsjax
from benchmarks.efficiency.task import Task

PyTree = Any
Batch = Any
Row = dict[str, Any]

DDP_ADAM, DILOCO, APTS = "DDP-Adam", "DiLoCo", "APTS"
NESTEROV_MOMENTUM = 0.9


class Method(NamedTuple):
  """One configured method on W simulated workers.

  Attributes:
    name: ``DDP_ADAM``, ``DILOCO`` or ``APTS``.
    config: its settings, e.g. ``{"lr": 1e-3}``, for the tables.
    workers: W.
    period: H, global minibatches per exchange.
    init: ``params -> state``.
    exchange: ``(state, minibatches) -> state``, minibatches with leaves (H, B, ...), jitted.
    params: ``state -> the global parameters``.
    diagnostics: ``state -> Row`` of scalars worth logging (empty for most methods).
  """
  name: str
  config: Row
  workers: int
  period: int
  init: Callable[[PyTree], Any]
  exchange: Callable[[Any, Batch], Any]
  params: Callable[[Any], PyTree]
  diagnostics: Callable[[Any], Row]


def jit(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
  """``jax.jit`` with ``aptsjax.parallel.CPU_COMPILER_OPTIONS`` on CPU (faster compilation of
  the APTS step, the same step time), the same for every method."""
  on_cpu = jax.default_backend() == "cpu"
  return jax.jit(fn, compiler_options=dict(aptsjax.parallel.CPU_COMPILER_OPTIONS) if on_cpu
                 else {}, **kwargs)


def no_diagnostics(state: Any) -> Row:
  """Nothing to log."""
  del state
  return {}


def adam_step(tx: optax.GradientTransformation, params: PyTree, opt: Any, grads: PyTree
              ) -> tuple[PyTree, Any]:
  """One optimizer step: ``(params, opt_state)`` after applying ``grads``."""
  updates, opt = tx.update(grads, opt, params)
  return optax.apply_updates(params, updates), opt


def ddp_adam(task: Task, workers: int, lr: float) -> Method:
  """DDP-Adam: per global minibatch, the global gradient and one Adam step.

  Args:
    task: the task.
    workers: W (the global gradient is the mean of the W workers' with equal b).
    lr: Adam's learning rate.

  Returns:
    The Method (H = 1).
  """
  tx = optax.adamw(lr, weight_decay=task.weight_decay)

  def exchange(state: tuple[PyTree, Any], minibatches: Batch) -> tuple[PyTree, Any]:
    params, opt = state
    batch = jax.tree.map(lambda x: x[0], minibatches)
    return adam_step(tx, params, opt, jax.grad(task.loss_fn)(params, batch))

  return Method(DDP_ADAM, {"lr": lr}, workers, 1, lambda p: (p, tx.init(p)),
                jit(exchange), lambda s: s[0], no_diagnostics)


def inner_round(task: Task, inner: optax.GradientTransformation, theta: PyTree, opt: Any,
                shards: Batch) -> tuple[PyTree, Any]:
  """One DiLoCo worker's round: inner steps from theta, one per local minibatch.

  Args:
    task: the task.
    inner: the inner optimizer.
    theta: the global parameters.
    opt: the worker's inner optimizer state.
    shards: its H minibatches, leaves (H, b, ...).

  Returns:
    (theta_i, opt) after H steps.
  """
  def step(carry: tuple[PyTree, Any], batch: Batch) -> tuple[tuple[PyTree, Any], None]:
    params, state = carry
    return adam_step(inner, params, state, jax.grad(task.loss_fn)(params, batch)), None

  return jax.lax.scan(step, (theta, opt), shards)[0]


def outer_step(outer: optax.GradientTransformation, theta: PyTree, outer_opt: Any,
               mean_theta: PyTree) -> tuple[PyTree, Any]:
  """DiLoCo's outer step on the pseudo-gradient delta = theta - mean_i theta_i."""
  delta = jax.tree.map(jnp.subtract, theta, mean_theta)
  return adam_step(outer, theta, outer_opt, delta)


def diloco_optimizers(inner_lr: float, outer_lr: float, weight_decay: float = 0.0
                      ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(inner AdamW with the task's weight decay, 0: Adam; outer Nesterov SGD, momentum 0.9)."""
  return (optax.adamw(inner_lr, weight_decay=weight_decay),
          optax.sgd(outer_lr, momentum=NESTEROV_MOMENTUM, nesterov=True))


def diloco(task: Task, workers: int, inner_lr: float, period: int, outer_lr: float) -> Method:
  """DiLoCo: H inner Adam steps per worker, then one outer Nesterov step on the mean.

  Args:
    task: the task.
    workers: W.
    inner_lr: the inner Adam's learning rate.
    period: H, inner steps (global minibatches) per round.
    outer_lr: the outer SGD's learning rate.

  Returns:
    The Method; its state is (theta, outer state, inner states with a leading axis W).
  """
  inner, outer = diloco_optimizers(inner_lr, outer_lr, task.weight_decay)

  def init(params: PyTree) -> tuple[PyTree, Any, Any]:
    inner_opt = jax.vmap(lambda _: inner.init(params))(jnp.arange(workers))
    return params, outer.init(params), inner_opt

  def exchange(state: tuple[PyTree, Any, Any], minibatches: Batch) -> tuple[PyTree, Any, Any]:
    theta, outer_opt, inner_opt = state
    shards = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0], workers, -1, *x.shape[2:]), 0, 1), minibatches)
    thetas, inner_opt = jax.vmap(lambda o, s: inner_round(task, inner, theta, o, s))(
        inner_opt, shards)
    mean_theta = jax.tree.map(lambda x: jnp.mean(x, axis=0), thetas)
    return (*outer_step(outer, theta, outer_opt, mean_theta), inner_opt)

  config = {"inner_lr": inner_lr, "H": period, "outer_lr": outer_lr}
  return Method(DILOCO, config, workers, period, init, jit(exchange), lambda s: s[0],
                no_diagnostics)


def apts_batch(minibatches: Batch) -> Batch:
  """APTS's batch of H global minibatches (leaves (H, B, ...)): ``aptsjax.data.stream`` of them."""
  count = np.shape(jax.tree.leaves(minibatches)[0])[0]
  return aptsjax.data.stream([jax.tree.map(lambda x, h=h: x[h], minibatches)
                              for h in range(count)])


def apts_diagnostics(state: tuple[PyTree, aptsjax.APTSState]) -> Row:
  """Whether the summed local step was accepted, the radius and the mean local steps."""
  s = jax.device_get(state[1])
  return {"apts_accepted": bool(s.apts_accepted), "radius": float(s.radius),
          "local_steps": float(np.mean(s.local_steps))}


def apts(task: Task, workers: int, period: int) -> Method:
  """APTS with the library's defaults, W subdomains (one per worker), H minibatches an update.

  Args:
    task: the task.
    workers: W, the number of subdomains.
    period: H, global minibatches per update.

  Returns:
    The Method; its state is (params, APTSState).
  """
  tx = aptsjax.apts(task.loss_fn, num_subdomains=workers)

  def step(state: tuple[PyTree, Any], batch: Batch) -> tuple[PyTree, Any]:
    params, opt = state
    updates, opt = tx.update(None, opt, params, batch=batch)
    return optax.apply_updates(params, updates), opt

  jitted = jit(step)
  return Method(APTS, {"H": period}, workers, period, lambda p: (p, tx.init(p)),
                lambda state, minibatches: jitted(state, apts_batch(minibatches)),
                lambda s: s[0], apts_diagnostics)


def build(name: str, task: Task, workers: int, config: Row) -> Method:
  """A method by name and settings (``Method.config``'s keys).

  Args:
    name: ``DDP_ADAM`` (config ``lr``), ``DILOCO`` (``inner_lr``, ``H``, ``outer_lr``) or
      ``APTS`` (``H``).
    task: the task.
    workers: W.
    config: the settings.

  Returns:
    The Method.
  """
  if name == DDP_ADAM:
    return ddp_adam(task, workers, config["lr"])
  if name == DILOCO:
    return diloco(task, workers, config["inner_lr"], config["H"], config["outer_lr"])
  if name == APTS:
    return apts(task, workers, config["H"])
  raise ValueError(f"unknown method {name!r}")
