"""The training methods of the paper benchmark (``benchmarks.paper``), one compiled step each.

Every method is a ``Runner``: ``init(seed, lr)`` gives a fresh (params, state) carry and
``epoch(carry, epoch, seed)`` trains one epoch (one pass over the training rows) and returns the
new carry and that epoch's ``Work``. A runner is built (and its step compiled) once per
configuration and reused across seeds and learning rates (the jitted step is cached by shape).

Work conventions (each counted as samples processed, divided by the training rows later):

* APTS / SAPTS (``aptsjax.parallel.apts_trainer``), per iteration on a laid-out batch of R rows
  (own rows plus the shared rows of the overlap layout): forward = backward =
  (1 + J max_i local_steps_i + 1 + global_steps) x R, J the parameter blocks (1 without). The
  local iterations run as one vmapped loop over the N x J local problems, each over its
  subdomain's R / N rows, so one local step of every problem processes J R rows, and the loop
  runs until the slowest problem stops (max_i). The terms are
  the block gradients at theta^k, the local trials, the evaluation at theta^k + s~ and the
  global TR steps (``aptsjax/apts.py``). All-reduced floats per iteration: read off the compiled
  HLO when the step runs on several devices, else the documented formula 4 n + 4 (what a
  data-parallel run all-reduces: g^k, s~, the gradient at theta^k + s~, one per global step,
  plus scalars).
* plain TR (full batch, the gradient reused from the state): 1 forward + 1 backward per
  iteration (the trial point), plus one of each at the first iteration; data-parallel it would
  all-reduce n + 1 floats per iteration (the trial gradient and loss).
* Adam / SGD: 1 forward + 1 backward per minibatch; n floats per step data-parallel.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aptsjax
from aptsjax import data, parallel
from aptsjax.optim.apts import exchanged_vectors
from aptsjax.optim.config import APTSConfig, TrustRegionConfig, configure_apts
from aptsjax.tools import comm
from benchmarks.common import datasets, models

BATCH_FRACTION = 6   # minibatch = 1/6 of the training rows (the paper: 10,000 of 60,000) ...
BATCH_MULTIPLE = 12  # ... rounded down to a multiple of 12 so that N = 2, 4, 6 divide it
OVERLAP = 0.05       # SAPTS: subdomain overlap and overlap between consecutive minibatches
Carry = tuple[Any, Any]


class Method(NamedTuple):
  """One configuration of the benchmark.

  Attributes:
    kind: "apts", "tr", "adam" or "sgd".
    num_subdomains: N (APTS only; 1 otherwise).
    second_order: L-SR1 models (APTS, TR).
    minibatch: 660-row minibatches (True) or the full training set.
    param_blocks: APTS parameter blocks (``aptsjax.apts(param_blocks=...)``, e.g. "layers"),
      or None: subdomains of the data only.
    block_bound: how the local bound is split over the blocks (``aptsjax.apts(block_bound=...)``).
  """
  kind: str
  num_subdomains: int = 1
  second_order: bool = False
  minibatch: bool = False
  param_blocks: str | None = None
  block_bound: str = "equal"

  @property
  def name(self) -> str:
    """A short label such as "SAPTS N=2 o1", "APTS N=4 o2", "APTS N=2 x layers o1", "Adam"."""
    order = "o2" if self.second_order else "o1"
    if self.kind == "apts":
      rule = "" if self.block_bound == "equal" else f"/{self.block_bound}"
      blocks = f" x {self.param_blocks}{rule}" if self.param_blocks else ""
      return f"{'SAPTS' if self.minibatch else 'APTS'} N={self.num_subdomains}{blocks} {order}"
    if self.kind == "tr":
      return f"TR {order}"
    base = {"adam": "Adam", "sgd": "SGD"}[self.kind]
    return base if self.minibatch else f"{base} full"

  @property
  def batching(self) -> str:
    """"minibatch" or "full"."""
    return "minibatch" if self.minibatch else "full"

  @property
  def order(self) -> str:
    """"o1" or "o2" (Adam and SGD are first order)."""
    return "o2" if self.second_order else "o1"


class Work(NamedTuple):
  """What one epoch did: iterations, samples through forward/backward passes, floats.

  The last four fields are APTS / SAPTS statistics over the epoch's iterations (NaN for the
  other methods): the mean of max_i local steps, the fraction of accepted APTS steps s~, and
  the global radius after each iteration (mean) and after the last one.
  """
  iterations: int
  forward_rows: float
  backward_rows: float
  allreduce_floats: float
  seconds: float
  local_steps: float = float("nan")
  apts_accepted: float = float("nan")
  radius_mean: float = float("nan")
  radius_final: float = float("nan")


class Runner(NamedTuple):
  """A compiled method: ``init(seed, lr) -> carry``, ``epoch(carry, epoch, seed)``.

  ``warmup()`` runs one discarded step so that compilation stays out of the timed epochs.
  """
  method: Method
  init: Callable[[int, float], Carry]
  epoch: Callable[[Carry, int, int], tuple[Carry, Work]]
  floats_per_iter: float
  warmup: Callable[[], None]
  devices: int = 1  # devices the step runs on (over every process)


def all_methods(ns: tuple[int, ...] = (2, 4, 6)) -> list[Method]:
  """The default run's methods: APTS and SAPTS (N in ``ns``, o1 and o2), TR o2, Adam, SGD.

  Adam and SGD run on minibatches ("Adam", "SGD"); their full-batch variants ("Adam full",
  "SGD full") are in ``extra_methods`` (``--methods``), left out of the default run for time.
  """
  out = [Method("apts", n, o, mb) for mb in (False, True) for o in (False, True) for n in ns]
  return out + [Method("tr", 1, True, False), Method("adam", minibatch=True),
                Method("sgd", minibatch=True)]


def minibatch_size(num_rows: int) -> int:
  """Rows per minibatch: 660 for MNIST-5k's 4,000 training rows, 9,996 for MNIST's 60,000."""
  return max(BATCH_MULTIPLE, num_rows // BATCH_FRACTION // BATCH_MULTIPLE * BATCH_MULTIPLE)


def extra_methods() -> list[Method]:
  """Methods available through ``--methods`` only: full-batch Adam and SGD, and APTS / SAPTS
  with one block per layer of the parameters (N = 1: parameter blocks only; N = 2: data x
  layers), first order; the local bound split equally over the blocks ("x layers") or by their
  sizes ("x layers/size")."""
  blocks = [Method("apts", n, False, mb, "layers", rule) for rule in ("equal", "size")
            for mb in (False, True) for n in (1, 2)]
  return [Method("adam", minibatch=False), Method("sgd", minibatch=False)] + blocks


def hlo_floats(compiled: Any) -> int:
  """All-reduced elements of one compiled step (each all-reduce times its known trip count)."""
  records = comm.allreduce_stats(compiled)
  return int(sum(r.elements * (r.trips or 0) for r in records))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """Runs ``fn``, blocks on its result and returns (result, seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def _batches(method: Method, train: tuple[np.ndarray, np.ndarray], seed: int, epoch: int,
             overlap: float, size: int) -> list[Any]:
  """The epoch's batches: ``size``-row minibatches, or the whole training set once."""
  if not method.minibatch:
    return [train]
  return list(data.iterate_minibatches(train, size, overlap=overlap, seed=seed, epoch=epoch))


def apts_runner(method: Method, module: Any, ds: datasets.Dataset, nparams: int,
                batch_size: int, **apts_options: Any) -> Runner:
  """APTS (full batch, no overlap) or SAPTS (minibatches, 5% overlap both ways).

  ``apts_options``: further keywords of ``aptsjax.apts`` (hyperparameters, a local solver).
  """
  loss_fn = models.cross_entropy_loss(module)
  overlap = OVERLAP if method.minibatch else 0.0
  # remainder="drop": the layout rule leaves out the < N rows that do not fill a block (1 of the
  # 660 at N = 6), as the paper's protocol does.
  if method.param_blocks is not None:
    apts_options = {"param_blocks": method.param_blocks, "block_bound": method.block_bound,
                    **apts_options}
  trainer = parallel.apts_trainer(loss_fn, method.num_subdomains, overlap=overlap,
                                  second_order=method.second_order, remainder="drop",
                                  **apts_options)
  settings = {k: v for k, v in apts_options.items()
              if k == "base" or k in APTSConfig._fields or k in TrustRegionConfig._fields}
  global_steps = configure_apts(**settings).steps_after(streaming=False)
  train = (ds.x_train, ds.y_train)
  full = None if method.minibatch else trainer.shard_batch(train)

  def init(seed: int, lr: float = 0.0) -> Carry:
    del lr
    params = trainer.replicate(models.init_params(module, ds.num_features, seed=seed))
    return params, trainer.init(params)

  def sample() -> Any:
    return full if full is not None else trainer.shard_batch(
        _batches(method, train, 0, 0, overlap, batch_size)[0])

  def warmup() -> None:
    jax.block_until_ready(trainer.step(*init(0), sample()))

  floats = float(exchanged_vectors(method.second_order, **settings)) * nparams + 4.0
  if trainer.mesh is not None:
    floats = float(hlo_floats(trainer.lower(*init(0), sample()).compile()))

  def epoch(carry: Carry, ep: int, seed: int) -> tuple[Carry, Work]:
    params, state = carry
    metrics, rows = [], 0
    start = time.perf_counter()
    for batch in _batches(method, train, seed, ep, overlap, batch_size):
      placed = full if full is not None else trainer.shard_batch(batch)
      rows = int(jax.tree.leaves(placed)[0].shape[0])
      params, state = trainer.step(params, state, placed)
      metrics.append(trainer.metrics(state))  # replicated on every process
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    stat = lambda key: np.stack([np.asarray(m[key]) for m in metrics]).astype(float)
    steps = stat("local_steps")                     # (iterations, N x J)
    local, radius = steps.max(axis=1), stat("radius")
    num_blocks = steps.shape[1] // method.num_subdomains
    passes = float(np.sum(2 + global_steps + num_blocks * local)) * rows
    return (params, state), Work(len(metrics), passes, passes, floats * len(metrics), seconds,
                                 float(local.mean()), float(stat("apts_accepted").mean()),
                                 float(radius.mean()), float(radius[-1]))

  devices = 1 if trainer.mesh is None else int(trainer.mesh.size)
  return Runner(method, init, epoch, floats, warmup, devices)


def tr_runner(method: Method, module: Any, ds: datasets.Dataset, nparams: int,
              batch_size: int, base: aptsjax.APTSConfig | None = None) -> Runner:
  """Plain trust region on the full batch: ``TrustRegionConfig(min_radius=1e-3)`` (the paper's
  floor), or the global region of the preset ``base`` (``APTSConfig.paper().trust_region`` is
  the paper's TR)."""
  del batch_size  # full batch only
  loss_fn = models.cross_entropy_loss(module)
  region = aptsjax.TrustRegionConfig(min_radius=1e-3) if base is None else base.trust_region
  tx = aptsjax.trust_region(loss_fn, second_order=method.second_order, base=region)
  value_and_grad = aptsjax.value_and_grad_from_state(loss_fn)
  train = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
  rows = len(ds.y_train)

  @jax.jit
  def step(params: Any, state: Any) -> Carry:
    loss, grads = value_and_grad(params, train, state=state)
    updates, state = tx.update(grads, state, params, batch=train, value=loss)
    return optax.apply_updates(params, updates), state

  def init(seed: int, lr: float = 0.0) -> Carry:
    del lr
    params = models.init_params(module, ds.num_features, seed=seed)
    return params, tx.init(params)

  def epoch(carry: Carry, ep: int, seed: int) -> tuple[Carry, Work]:
    del seed
    (params, state), seconds = _timed(lambda: step(*carry))
    passes = float(rows * (2 if ep == 0 else 1))
    return (params, state), Work(1, passes, passes, float(nparams + 1), seconds)

  return Runner(method, init, epoch, float(nparams + 1),
                lambda: jax.block_until_ready(step(*init(0))))


def first_order_runner(method: Method, module: Any, ds: datasets.Dataset, nparams: int,
                       batch_size: int) -> Runner:
  """Adam or SGD (learning rate held in the state: one compile for every rate)."""
  loss_fn = models.cross_entropy_loss(module)
  make = optax.inject_hyperparams(getattr(optax, method.kind))
  tx = make(learning_rate=1e-3)
  train = (ds.x_train, ds.y_train)

  @jax.jit
  def step(params: Any, opt_state: Any, batch: Any) -> Carry:
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def init(seed: int, lr: float = 1e-3) -> Carry:
    params = models.init_params(module, ds.num_features, seed=seed)
    return params, make(learning_rate=lr).init(params)

  def epoch(carry: Carry, ep: int, seed: int) -> tuple[Carry, Work]:
    params, opt_state = carry
    batches = _batches(method, train, seed, ep, 0.0, batch_size)
    start = time.perf_counter()
    for batch in batches:
      params, opt_state = step(params, opt_state, batch)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    rows = float(sum(len(b[1]) for b in batches))
    return (params, opt_state), Work(len(batches), rows, rows, float(nparams) * len(batches),
                                     seconds)

  def warmup() -> None:
    jax.block_until_ready(step(*init(0), _batches(method, train, 0, 0, 0.0, batch_size)[0]))

  return Runner(method, init, epoch, float(nparams), warmup)


def build(method: Method, module: Any, ds: datasets.Dataset, batch_size: int | None = None,
          **apts_options: Any) -> Runner:
  """The runner of ``method`` on ``ds`` (compiles lazily on the first step).

  ``batch_size``: minibatch rows; default ``minibatch_size`` of ``ds``'s training rows (pass the
  full training set's size when training on a validation split, so the batches stay the same).
  ``apts_options``: further keywords of ``aptsjax.apts`` (APTS / SAPTS; for TR only ``base``,
  an ``aptsjax.APTSConfig`` whose global region TR uses; ValueError else).
  """
  batch_size = batch_size or minibatch_size(len(ds.y_train))
  nparams = models.count_params(jax.eval_shape(
      lambda: models.init_params(module, ds.num_features)))
  tr_only_base = method.kind == "tr" and set(apts_options) <= {"base"}
  if apts_options and method.kind != "apts" and not tr_only_base:
    raise ValueError(f"apts options {sorted(apts_options)} apply to APTS / SAPTS only, not to "
                     f"{method.name}; build it without them.")
  if method.kind == "apts":
    return apts_runner(method, module, ds, nparams, batch_size, **apts_options)
  if method.kind == "tr":
    return tr_runner(method, module, ds, nparams, batch_size, **apts_options)
  if method.kind in ("adam", "sgd"):
    return first_order_runner(method, module, ds, nparams, batch_size)
  raise ValueError(f"unknown method kind {method.kind!r}")


def evaluator(module: Any, ds: datasets.Dataset) -> Callable[[Any], tuple[float, float]]:
  """``params -> (train loss on the plain training set, test accuracy)``, jitted, untimed."""
  loss_fn = jax.jit(models.cross_entropy_loss(module))
  train = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
  x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

  def evaluate(params: Any) -> tuple[float, float]:
    params = jax.device_get(params)
    loss = float(loss_fn(params, train))
    return loss, models.accuracy(module, params, x_test, y_test)

  return evaluate
