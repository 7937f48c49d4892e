"""One to many devices with one argument: mesh, batch sharding and a jitted APTS train step.

    trainer = aptsjax.parallel.apts_trainer(loss_fn, num_subdomains=4, num_devices=4)
    state = trainer.init(params)
    batch = trainer.shard_batch(batch)            # overlap layout + sharding over the devices
    params, state = trainer.step(params, state, batch)   # donates the params and state passed in

With ``num_devices=1`` the same code runs ``aptsjax.apts(axis_name=None)`` under ``jax.jit``;
with D > 1 it runs ``aptsjax.apts(axis_name="data")`` under ``jax.shard_map`` on a 1-D mesh of
D devices (check_vma=True), the state sharded by ``aptsjax.state_specs``. Subdomain i holds the
same rows whatever D is, so the results agree up to float rounding. For ``jax.pmap`` users,
``pmap_state`` / ``unpmap_state`` (``aptsjax.parallel.pmap``) convert a state to per-device form
and back.

The pieces: ``_checked_devices`` checks the configuration and picks D; ``build_mesh`` builds the
mesh; ``BatchLayout`` (``aptsjax.parallel.layout``) lays out and shards the batches,
``Placement`` (``aptsjax.parallel.placement``) the parameters and states; ``TrainStep``
(``aptsjax.parallel.step``) jits, donates and reports the update; ``_one_device_trainer`` and
``_mesh_trainer`` put them together.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aptsjax import data
from aptsjax.numerics.checks import as_int
from aptsjax.optim.apts import apts
from aptsjax.parallel import distributed
from aptsjax.parallel import sharding
from aptsjax.parallel.layout import BatchLayout
from aptsjax.parallel.mesh import build_mesh
from aptsjax.parallel.mesh import default_num_devices
from aptsjax.parallel.placement import Placement
from aptsjax.parallel.sharding import state_specs
from aptsjax.parallel.step import NONFINITE_ACTIONS
from aptsjax.parallel.step import TrainStep
from aptsjax.parallel.step import distinct

PyTree = Any


class Trainer(NamedTuple):
  """A jitted APTS training step on one or several devices and processes (see ``apts_trainer``).

  Attributes:
    tx: the ``aptsjax.apts`` transformation in use.
    mesh: the device mesh over every process's devices (None on one device).
    axis_name: the mesh axis name (None on one device).
    num_subdomains: N.
    overlap: the fraction of shared rows in the subdomain layout.
    init: ``params -> state``, placed on the devices (per-subdomain leaves sharded, the rest
      replicated); checks at start-up that every process has the same parameter shapes.
    shard_batch: ``batch -> batch``: the global batch (every process passes the same one; only
      this process's rows are read, so a memory-mapped array costs only those rows) laid out by
      ``aptsjax.data.overlapping_subdomains`` and sharded over the devices, subdomain i's rows on
      the device that holds subdomain i. Rows the layout drops are reported as ``remainder``
      says (a ``UserWarning`` by default).
    step: ``(params, state, batch) -> (params, state)`` (a ``step.TrainStep``), jitted; ``batch``
      from ``shard_batch``.
      Params and the state's scalars come back replicated on every device of every process.
      A skipped update (``state.nonfinite``) warns or raises as ``on_nonfinite`` says. The
      params and state passed in are donated: their buffers are reused for the results (so
      memory holds one copy of the parameters and the N memories, not two), and those arrays
      are deleted; use the returned ones, and copy first (``jax.tree.map(jnp.copy, params)``)
      what you still need. Arrays that are not already where the step runs (NumPy arrays,
      parameters not yet replicated on the mesh) are copied there first and stay usable.
    process_rows: ``num_rows -> indices``: the rows of an ``num_rows``-row global batch that this
      process's devices hold, in order (own rows and shared rows of each of its subdomains).
    shard_local_batch: ``(local_batch, num_rows) -> batch``: like ``shard_batch`` for a process
      that loaded only ``take_rows(batch, process_rows(num_rows))`` itself.
    replicate: ``params -> params`` as global arrays on the mesh, replicated on every device, or
      on a 2-D mesh replicated over the data axis and sharded over the model axis as
      ``param_specs`` says (``step`` does this itself; use it to hand parameters to other
      jitted code on the mesh).
    metrics: ``state -> dict`` of ``METRICS`` fields, replicated on every device of every
      process (``local_steps`` gathered to all N (N J with ``param_blocks``) values), so any
      process can read them; with ``has_aux=True`` also ``"aux"``, each subdomain's aux output
      (leading axis N).
    model_axis: the model axis name on a 2-D mesh (``model_devices > 1``), else None.
    state_shardings: ``(state, params=None) -> shardings``: the NamedShardings of a state (or
      of its shape structs) on the mesh, e.g. to restore a checkpoint; None on one device.
    lower: ``(params, state, batch) -> jax.stages.Lowered``: ``step`` lowered for these
      arguments, for HLO inspection (``trainer.lower(...).compile()``, ``aptsjax.tools.comm``);
      donates nothing. Pass params placed as ``step`` places them (``replicate``).
  """
  tx: optax.GradientTransformationExtraArgs
  mesh: jax.sharding.Mesh | None
  axis_name: str | None
  num_subdomains: int
  overlap: float
  init: Callable[[PyTree], NamedTuple]
  shard_batch: Callable[[Any], Any]
  step: Callable[..., tuple[PyTree, NamedTuple]]
  process_rows: Callable[[int], np.ndarray]
  shard_local_batch: Callable[[Any, int], Any]
  replicate: Callable[[PyTree], PyTree]
  metrics: Callable[[NamedTuple], dict[str, jax.Array]]
  model_axis: str | None = None
  state_shardings: Callable[..., PyTree] | None = None
  lower: Callable[..., jax.stages.Lowered] | None = None


METRICS = ("value", "radius", "accepted", "apts_accepted", "stalled", "nonfinite", "iteration",
           "predicted_reduction", "actual_reduction", "local_steps")


def _metrics(state: NamedTuple) -> dict[str, jax.Array]:
  """The ``METRICS`` fields, and ``aux`` (per subdomain) once an update with ``has_aux`` set it."""
  aux = getattr(state, "aux", None)
  return {name: getattr(state, name) for name in METRICS} | ({} if aux is None else {"aux": aux})


# On CPU, XLA's loop emitters compile the second-order trainer step about 1.5x faster than its
# fusion emitters (paper MLP: 13 s -> 9 s) at the same step time (benchmarks/cost/apts_profile.py).
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


class _Setup(NamedTuple):
  """The trainer's checked configuration."""
  num_subdomains: int
  num_devices: int
  model_devices: int
  overlap: float
  axis_name: str
  model_axis: str
  on_nonfinite: str
  remainder: str
  compiler_options: dict[str, Any]


def _checked_devices(num_subdomains: Any, num_devices: Any, model_devices: Any, overlap: Any,
                     on_nonfinite: str, remainder: str, devices: list | None
                     ) -> tuple[int, int, int, list]:
  """``(N, D, M, devices)`` checked; D chosen when None. Arguments are checked before any
  device is queried."""
  num_subdomains = as_int("num_subdomains", num_subdomains, 1)
  model_devices = as_int("model_devices", model_devices, 1)
  if num_devices is not None:
    num_devices = as_int("num_devices", num_devices, 1)
  data.as_overlap(overlap)
  if on_nonfinite not in NONFINITE_ACTIONS:
    raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}.")
  if remainder not in data.REMAINDER_ACTIONS:
    raise ValueError(f"remainder must be one of {data.REMAINDER_ACTIONS}, got {remainder!r}.")
  devices = list(devices if devices is not None else jax.devices())
  if model_devices > len(devices):
    raise ValueError(f"model_devices={model_devices} but only {len(devices)} devices are "
                     "available.")
  if num_devices is None:
    num_devices = default_num_devices(num_subdomains, devices[::model_devices])
    _warn_idle(num_subdomains, num_devices, model_devices, len(devices[::model_devices]))
  if num_devices * model_devices > len(devices):
    raise ValueError(f"num_devices={num_devices} x model_devices={model_devices} devices are "
                     f"needed but only {len(devices)} are available.")
  if num_subdomains % num_devices:
    raise ValueError(f"num_subdomains={num_subdomains} is not divisible by "
                     f"num_devices={num_devices}.")
  return num_subdomains, num_devices, model_devices, devices


def _warn_idle(num_subdomains: int, num_devices: int, model_devices: int, available: int) -> None:
  """A ``UserWarning`` when the default ``num_devices`` leaves some of the devices idle."""
  if num_devices >= available:
    return
  unit = "devices" if model_devices == 1 else f"replicas of model_devices={model_devices}"
  warnings.warn(
      f"num_subdomains={num_subdomains} on {available} available {unit}: the trainer uses "
      f"num_devices={num_devices} (the most that divide N) and leaves {available - num_devices} "
      f"idle. To use all {available}, make num_subdomains a multiple of {available} (e.g. "
      f"{available * -(-num_subdomains // available)}); to keep this layout, pass "
      f"num_devices={num_devices}, which also silences this warning.", UserWarning, stacklevel=4)


def _update(tx: optax.GradientTransformationExtraArgs, params: PyTree, state: NamedTuple,
            batch: Any) -> tuple[PyTree, NamedTuple]:
  """One APTS update: ``(params, state, batch) -> (params, state)``."""
  updates, state = tx.update(None, state, params, batch=batch)
  return optax.apply_updates(params, updates), state


def _sharded_update(tx: optax.GradientTransformationExtraArgs, mesh: jax.sharding.Mesh,
                    axis_name: str, params: PyTree, state: NamedTuple, batch: Any
                    ) -> tuple[PyTree, NamedTuple]:
  """``_update`` under ``jax.shard_map``, manual over the data axis only: the model axis stays
  automatic (see ``build_mesh``)."""
  specs = state_specs(state, axis_name)
  out = sharding.output_specs(state, specs, axis_name)
  return jax.shard_map(functools.partial(_update, tx), mesh=mesh,
                       in_specs=(P(), specs, P(axis_name)), out_specs=(P(), out),
                       axis_names={axis_name})(params, state, batch)


def _init_on_mesh(tx: optax.GradientTransformationExtraArgs, placement: Placement,
                  params: PyTree) -> NamedTuple:
  """``tx.init(params)`` placed on the mesh (checks that every process has the same params)."""
  distributed.check_same({"params": params}, "parameter pytree")
  if placement.model_axis is None:
    state = tx.init(params)
    return distinct(jax.device_put(state, placement.state_shardings(state)))
  params = placement.replicate(params)
  target = placement.state_shardings(jax.eval_shape(tx.init, params), params)
  return distinct(jax.jit(tx.init, out_shardings=target)(params))


def _one_device_trainer(tx: optax.GradientTransformationExtraArgs, setup: _Setup) -> Trainer:
  """No mesh: ``tx`` under ``jax.jit`` on the first device; the batch laid out on the host."""
  n, overlap = setup.num_subdomains, setup.overlap
  step = TrainStep(functools.partial(_update, tx), setup.on_nonfinite, setup.compiler_options)
  return Trainer(tx=tx, mesh=None, axis_name=None, num_subdomains=n, overlap=overlap,
                 init=lambda params: distinct(tx.init(params)),
                 shard_batch=functools.partial(data.overlapping_subdomains, num_subdomains=n,
                                               overlap=overlap, remainder=setup.remainder),
                 step=step,
                 process_rows=functools.partial(data.overlap_layout, num_subdomains=n,
                                                overlap=overlap),
                 shard_local_batch=lambda local, num_rows: local, replicate=lambda p: p,
                 metrics=jax.jit(_metrics), model_axis=None,
                 state_shardings=lambda state, params=None: None, lower=step.lower)


def _mesh_trainer(tx: optax.GradientTransformationExtraArgs, setup: _Setup,
                  mesh: jax.sharding.Mesh, param_specs: PyTree | None) -> Trainer:
  """``tx`` on a 1-D (data) or 2-D (data x model) mesh; the step jitted at its first call."""
  model_axis = setup.model_axis if setup.model_devices > 1 else None
  placement = Placement(mesh, setup.axis_name, model_axis, param_specs)
  layout = BatchLayout(mesh, setup.axis_name, setup.num_subdomains, setup.overlap,
                       setup.remainder)
  fn = (functools.partial(_update, tx) if setup.num_devices == 1
        else functools.partial(_sharded_update, tx, mesh, setup.axis_name))
  # On a 2-D mesh the step is jitted at its first call, when the parameter specs are known.
  step = TrainStep(fn, setup.on_nonfinite, setup.compiler_options, place=placement.replicate,
                   out_shardings=placement.step_shardings if model_axis is not None else None)
  return Trainer(tx=tx, mesh=mesh, axis_name=setup.axis_name,
                 num_subdomains=setup.num_subdomains, overlap=setup.overlap,
                 init=functools.partial(_init_on_mesh, tx, placement),
                 shard_batch=layout.shard_batch, step=step, process_rows=layout.process_rows,
                 shard_local_batch=layout.shard_local_batch, replicate=placement.replicate,
                 metrics=jax.jit(_metrics, out_shardings=NamedSharding(mesh, P())),
                 model_axis=model_axis, state_shardings=placement.state_shardings,
                 lower=step.lower)


def apts_trainer(loss_fn: Callable[[PyTree, Any], jax.Array], num_subdomains: int, *,
                 num_devices: int | None = None, overlap: float = 0.0, axis_name: str = "data",
                 model_devices: int = 1, model_axis: str = "model",
                 param_specs: PyTree | None = None, devices: list | None = None,
                 on_nonfinite: str = "warn", remainder: str = "warn",
                 compiler_options: dict[str, Any] | None = None,
                 **apts_kwargs: Any) -> Trainer:
  """Builds the mesh, the batch layout and a jitted APTS train step, on one or many processes.

  ``step`` donates the params and state it is given (see ``Trainer``): keep only the ones it
  returns. The same call runs on one device, on D devices of one process, and across processes started
  with ``jax.distributed`` (see ``aptsjax.distributed`` and ``python -m aptsjax.parallel.launch``): the mesh
  spans ``jax.devices()`` of every process, and subdomain i holds the same rows in every case.
  With several processes, the configuration (N, D, overlap, apts keywords), the parameter shapes
  (``init``) and the first batch's shapes (``shard_batch``) are compared across processes and a
  mismatch raises ``ValueError``.

  With ``model_devices`` M > 1 the mesh is 2-D, D x M (``aptsjax.mesh.build_mesh``): each of
  the D replicas spans M devices, over which the parameters are sharded as ``param_specs`` says
  (tensor parallel, FSDP, ...), and with them the gradients, every L-SR1 stack and every
  per-subdomain state (``aptsjax.sharding.state_specs``); the subdomains are spread over the
  data axis as on a 1-D mesh. The results equal the single-device run up to float rounding
  (docs/guides/meshes.md).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(loss, aux)`` with ``has_aux=True``
      among ``apts_kwargs``: ``metrics`` then holds each subdomain's aux), a mean over the rows
      of batch. On a 2-D mesh
      it is traced with parameters sharded over the model axis; the compiler adds the model's
      collectives (the model axis is ``AxisType.Auto``).
    num_subdomains: N, the total number of subdomains.
    num_devices: D, the size of the data axis, dividing N (with P processes, a multiple of P);
      default: the largest possible with ``model_devices`` devices per replica, with a
      ``UserWarning`` when that leaves devices idle (N = 6 on 4 devices uses 3; passing
      ``num_devices`` silences it).
    overlap: shared rows / own rows of the subdomain layout, in [0, 1) (docs/method.md,
      "Overlap layout").
    axis_name: the data axis name.
    model_devices: M, the devices per replica (the size of the model axis; default 1, no model
      axis).
    model_axis: the model axis name.
    param_specs: one ``PartitionSpec`` per parameter leaf over ``model_axis`` (a pytree like the
      params, or a prefix such as ``P()`` for all); default: read by ``init`` from the params
      (``aptsjax.sharding.param_specs``: Flax NNX partitioning metadata, or the arrays'
      ``NamedSharding`` specs), replicated where there is none.
    devices: the devices to use (default ``jax.devices()``, all processes' devices).
    on_nonfinite: what ``step`` does after an update skipped because the loss or gradient at the
      current parameters was not finite (``state.nonfinite``; params and state unchanged):
      ``"warn"`` (default) issues a ``RuntimeWarning`` naming the iteration, from a host
      callback inside the jitted step (asynchronous, no per-step host sync; once, on process
      0); ``"raise"`` raises ``FloatingPointError`` from ``step`` (which then waits for every
      step to finish); ``"ignore"`` leaves it to ``state.nonfinite``.
    remainder: what ``shard_batch`` / ``shard_local_batch`` do when the layout drops rows (see
      ``aptsjax.data.check_remainder``): ``"warn"`` (default, a ``UserWarning``), ``"drop"``
      (quietly) or ``"raise"`` (ValueError).
    compiler_options: XLA options for compiling ``step`` (``jax.jit``'s); default
      ``CPU_COMPILER_OPTIONS`` on CPU devices, XLA's defaults elsewhere; ``{}`` for XLA's
      (needed to call ``step`` inside another ``jax.jit``: JAX refuses options on a nested jit).
    **apts_kwargs: passed to ``aptsjax.apts`` (local_steps, second_order, memory, has_aux,
      ``base`` and the options of ``aptsjax.APTSConfig``).

  Returns:
    A ``Trainer``.

  Raises:
    ValueError: an argument of the wrong type or value (named in the message), checked before
      any device is queried; N not divisible by D; a configuration differing across processes;
      (``init``) a parameter spec naming another axis than ``model_axis`` or not dividing its
      dimension.
  """
  num_subdomains, num_devices, model_devices, devices = _checked_devices(
      num_subdomains, num_devices, model_devices, overlap, on_nonfinite, remainder, devices)
  # With one replica (D = 1) nothing is manual: apts runs without a data axis under jax.jit on
  # the mesh (a shard_map over a size-1 axis is not needed, and XLA rejects its all-reduces).
  tx = apts(loss_fn, num_subdomains=num_subdomains,
            axis_name=axis_name if num_devices > 1 else None, **apts_kwargs)
  multi = num_devices * model_devices > 1
  mesh = build_mesh(num_devices, model_devices, devices, axis_name, model_axis) if multi else None
  chosen = list(mesh.devices.flat) if multi else devices[:1]
  distributed.check_same({"num_subdomains": num_subdomains, "num_devices": num_devices,
                          "model_devices": model_devices, "overlap": overlap,
                          "axis_name": axis_name, "model_axis": model_axis,
                          "on_nonfinite": on_nonfinite, "remainder": remainder,
                          "apts_kwargs": sorted(apts_kwargs.items()),
                          "devices": [(d.process_index, d.id) for d in chosen]},
                         "trainer configuration")
  if compiler_options is None:
    on_cpu = all(d.platform == "cpu" for d in chosen)
    compiler_options = dict(CPU_COMPILER_OPTIONS) if on_cpu else {}
  setup = _Setup(num_subdomains, num_devices, model_devices, overlap, axis_name, model_axis,
                 on_nonfinite, remainder, compiler_options)
  if not multi:
    return _one_device_trainer(tx, setup)
  return _mesh_trainer(tx, setup, mesh, param_specs)


def numpy_tree(tree: PyTree) -> PyTree:
  """Fetches a (replicated or sharded) pytree to host numpy arrays on every process.

  Arrays sharded over devices of other processes are all-gathered, so with several processes
  every process must call this at the same point.
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(fetch, tree)
