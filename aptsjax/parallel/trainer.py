"""One to many devices with one argument: mesh, batch sharding and a jitted APTS train step.

    trainer = aptsjax.parallel.apts_trainer(loss_fn, num_subdomains=4, num_devices=4)
    state = trainer.init(params)
    batch = trainer.shard_batch(batch)            # overlap layout + sharding over the devices
    params, state = trainer.step(params, state, batch)   # donates the params and state passed in

With ``num_devices=1`` the same code runs ``aptsjax.apts(axis_name=None)`` under ``jax.jit``;
with D > 1 it runs ``aptsjax.apts(axis_name="data")`` under ``jax.shard_map`` on a 1-D mesh of
D devices (check_vma=True), the state sharded by ``aptsjax.state_specs``. Subdomain i holds the
same rows whatever D is, so the results agree up to float rounding. For ``jax.pmap`` users,
``pmap_state`` / ``unpmap_state`` convert a state to per-device form and back.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aptsjax.optim.apts import apts
from aptsjax.optim.protocol import per_subdomain_fields
from aptsjax import data
from aptsjax.parallel import distributed
from aptsjax.parallel import sharding
from aptsjax.parallel.mesh import build_mesh
from aptsjax.parallel.mesh import default_num_devices  # re-exported  # pylint: disable=unused-import
from aptsjax.parallel.mesh import mesh_devices  # re-exported  # pylint: disable=unused-import
from aptsjax.parallel.sharding import state_specs
from aptsjax.numerics.checks import as_int
from aptsjax.parallel.step import NONFINITE_ACTIONS
from aptsjax.parallel.step import distinct as _distinct
from aptsjax.parallel.step import donating as _donating
from aptsjax.parallel.step import raise_nonfinite as _raise_nonfinite
from aptsjax.parallel.step import report_nonfinite as _report_nonfinite

PyTree = Any


def pmap_state(state: NamedTuple, num_devices: int) -> NamedTuple:
  """Reshapes a global state to ``jax.pmap`` form (a leading device axis on every leaf).

  Per-subdomain leaves (N, ...) become (D, N / D, ...): device d holds subdomains
  [d N / D, (d + 1) N / D), the same ones it holds under ``jax.shard_map``; the other leaves are
  replicated to (D, ...).
  """
  per = per_subdomain_fields(state)

  def convert(name, value):
    if name in per:
      def split(x):
        if x.shape[0] % num_devices:
          raise ValueError(f"{x.shape[0]} subdomains do not divide over {num_devices} devices.")
        return jnp.reshape(x, (num_devices, x.shape[0] // num_devices) + x.shape[1:])
      return jax.tree.map(split, value)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_devices,) + jnp.shape(x)), value)

  return type(state)(**{k: convert(k, v) for k, v in state._asdict().items()})


def unpmap_state(state: NamedTuple) -> NamedTuple:
  """The inverse of ``pmap_state``: merges the device axis back into the global layout."""
  per = per_subdomain_fields(state)

  def convert(name, value):
    if name in per:
      return jax.tree.map(lambda x: jnp.reshape(x, (-1,) + x.shape[2:]), value)
    return jax.tree.map(lambda x: x[0], value)

  return type(state)(**{k: convert(k, v) for k, v in state._asdict().items()})


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
    step: ``(params, state, batch) -> (params, state)``, jitted; ``batch`` from ``shard_batch``.
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
      process can read them.
    model_axis: the model axis name on a 2-D mesh (``model_devices > 1``), else None.
    state_shardings: ``(state, params=None) -> shardings``: the NamedShardings of a state (or
      of its shape structs) on the mesh, e.g. to restore a checkpoint; None on one device.
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


METRICS = ("value", "radius", "accepted", "apts_accepted", "stalled", "nonfinite", "iteration",
           "predicted_reduction", "actual_reduction", "local_steps")


def _metrics(state: NamedTuple) -> dict[str, jax.Array]:
  return {name: getattr(state, name) for name in METRICS}


# On CPU, XLA's loop emitters compile the second-order trainer step about 1.5x faster than its
# fusion emitters (paper MLP: 13 s -> 9 s) at the same step time (benchmarks/apts_profile.py).
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


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
  with ``jax.distributed`` (see ``aptsjax.distributed`` and ``python -m aptsjax.launch``): the mesh
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
    loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the rows of batch. On a 2-D mesh
      it is traced with parameters sharded over the model axis; the compiler adds the model's
      collectives (the model axis is ``AxisType.Auto``).
    num_subdomains: N, the total number of subdomains.
    num_devices: D, the size of the data axis, dividing N (with P processes, a multiple of P);
      default: the largest possible with ``model_devices`` devices per replica.
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
    **apts_kwargs: passed to ``aptsjax.apts`` (local_steps, second_order, memory, ...).

  Returns:
    A ``Trainer``.

  Raises:
    ValueError: an argument of the wrong type or value (named in the message), checked before
      any device is queried; N not divisible by D; a configuration differing across processes;
      (``init``) a parameter spec naming another axis than ``model_axis`` or not dividing its
      dimension.
  """
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
  num_devices = num_devices or default_num_devices(num_subdomains, devices[::model_devices])
  if num_devices * model_devices > len(devices):
    raise ValueError(f"num_devices={num_devices} x model_devices={model_devices} devices are "
                     f"needed but only {len(devices)} are available.")
  if num_subdomains % num_devices:
    raise ValueError(f"num_subdomains={num_subdomains} is not divisible by "
                     f"num_devices={num_devices}.")
  multi = num_devices * model_devices > 1
  # With one replica (D = 1) nothing is manual: apts runs without a data axis under jax.jit on
  # the mesh (a shard_map over a size-1 axis is not needed, and XLA rejects its all-reduces).
  tx = apts(loss_fn, num_subdomains=num_subdomains,
            axis_name=axis_name if num_devices > 1 else None, **apts_kwargs)
  mesh = build_mesh(num_devices, model_devices, devices, axis_name, model_axis) if multi else None
  chosen = list(mesh.devices.flat) if multi else devices[:1]
  distributed.check_same({"num_subdomains": num_subdomains, "num_devices": num_devices,
                          "model_devices": model_devices, "overlap": overlap,
                          "axis_name": axis_name, "model_axis": model_axis,
                          "on_nonfinite": on_nonfinite, "remainder": remainder,
                          "apts_kwargs": sorted(apts_kwargs.items()),
                          "devices": [(d.process_index, d.id) for d in chosen]},
                         "trainer configuration")

  def layout(batch):
    return data.overlapping_subdomains(batch, num_subdomains, overlap, remainder)

  def one_step(params, state, batch):
    updates, state = tx.update(None, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  def reported(step):  # the jitted step with the on_nonfinite reporting
    def run(params, state, batch):
      params, state = step(params, state, batch)
      if on_nonfinite == "warn":
        _report_nonfinite(state)
      return params, state
    return run

  finish = _raise_nonfinite if on_nonfinite == "raise" else (lambda step: step)
  if compiler_options is None:
    on_cpu = all(d.platform == "cpu" for d in chosen)
    compiler_options = dict(CPU_COMPILER_OPTIONS) if on_cpu else {}
  jit = lambda f, **kw: _donating(jax.jit(reported(f), donate_argnums=(0, 1),
                                          compiler_options=compiler_options, **kw))
  if not multi:
    return Trainer(tx=tx, mesh=None, axis_name=None, num_subdomains=num_subdomains,
                   overlap=overlap, init=lambda params: _distinct(tx.init(params)),
                   shard_batch=layout,
                   step=finish(jit(one_step)),
                   process_rows=lambda m: data.overlap_layout(m, num_subdomains, overlap),
                   shard_local_batch=lambda local, m: local, replicate=lambda p: p,
                   metrics=jax.jit(_metrics), model_axis=None,
                   state_shardings=lambda state, params=None: None)

  two_d = model_devices > 1
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P(axis_name))
  here = {i // model_devices for i, d in enumerate(chosen)
          if d.process_index == jax.process_index()}
  mine = sorted(here)
  per_device = num_subdomains // num_devices
  checked_batch: list[bool] = []
  specs_seen: list[PyTree] = []   # the parameter specs, fixed by the first init / step

  def specs_for(params):  # 2-D only: the parameter specs, read or expanded once
    if not specs_seen:
      values = sharding.pure(params)
      if param_specs is None:
        found = sharding.param_specs(params)
      else:   # a pytree like the params, or a prefix of it
        found = jax.tree.map(lambda s, part: jax.tree.map(
            lambda x: P(*sharding.full_spec(s, np.ndim(x))), part),
            param_specs, values, is_leaf=lambda s: isinstance(s, P))
      sharding.check_specs(found, values, mesh, (model_axis,))
      specs_seen.append(found)
    return specs_seen[0]

  def replicate(params):  # host arrays must hold the same values on every process
    if not two_d:
      return jax.device_put(params, replicated)
    specs = specs_for(params)     # read before the Variables (and their metadata) are dropped
    return jax.device_put(sharding.pure(params), sharding.shardings(specs, mesh))

  def state_shardings(state, params=None):
    """NamedShardings of ``state`` (or its shape structs) on the trainer's mesh."""
    if not two_d:
      return sharding.shardings(state_specs(state, axis_name), mesh)
    params = state.grad if params is None else params
    return sharding.shardings(sharding.state_specs(state, axis_name, params,
                                                   specs_for(params)), mesh)

  def init(params):
    distributed.check_same({"params": params}, "parameter pytree")
    if not two_d:
      state = tx.init(params)
      return _distinct(jax.device_put(state, state_shardings(state)))
    params = replicate(params)
    target = state_shardings(jax.eval_shape(tx.init, params), params)
    return _distinct(jax.jit(tx.init, out_shardings=target)(params))

  def process_rows(num_rows):
    blocks = data.overlap_layout(num_rows, num_subdomains, overlap).reshape(num_subdomains, -1)
    return blocks[mine[0] * per_device:(mine[-1] + 1) * per_device].reshape(-1)

  def shard_local_batch(local, num_rows):
    own, shared = data.layout_sizes(num_rows, num_subdomains, overlap)
    data.check_remainder(num_rows, num_subdomains, overlap, remainder, stacklevel=3)
    total = num_subdomains * (own + shared)
    want = len(mine) * per_device * (own + shared)
    if data.row_count(local) != want:
      raise ValueError(f"this process must supply {want} rows (process_rows({num_rows})), got "
                       f"{data.row_count(local)}")
    if not checked_batch:
      distributed.check_same({"rows": num_rows, "batch": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct((total,) + tuple(np.shape(x)[1:]), x.dtype), local)},
          "batch")
      checked_batch.append(True)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        rows, np.asarray(x), (total,) + tuple(np.shape(x)[1:])), local)

  def shard_batch(batch):
    count = data.row_count(batch)
    return shard_local_batch(data.take_rows(batch, process_rows(count)), count)

  def mapped_step(params, state, batch):
    # Manual over the data axis only: the model axis stays automatic (see build_mesh).
    if num_devices == 1:
      return one_step(params, state, batch)
    specs = state_specs(state, axis_name)
    return jax.shard_map(one_step, mesh=mesh, in_specs=(P(), specs, P(axis_name)),
                         out_specs=(P(), specs), axis_names={axis_name})(params, state, batch)

  # The 1-D step is jitted now; the 2-D one at the first call, when the parameter specs are known.
  compiled: list[Any] = [] if two_d else [jit(mapped_step)]

  def jitted(params, state):
    if not compiled:
      out = {"out_shardings": (sharding.shardings(specs_for(params), mesh),
                               state_shardings(state, params))} if two_d else {}
      compiled.append(jit(mapped_step, **out))
    return compiled[0]

  def step(params, state, batch):
    params = replicate(params)
    return jitted(params, state)(params, state, batch)

  def lower(params, state, batch):  # for HLO inspection; params must already be placed
    return jitted(params, state).lower(params, state, batch)

  step.lower = lower
  return Trainer(tx=tx, mesh=mesh, axis_name=axis_name, num_subdomains=num_subdomains,
                 overlap=overlap, init=init, shard_batch=shard_batch, step=finish(step),
                 process_rows=process_rows, shard_local_batch=shard_local_batch,
                 replicate=replicate, metrics=jax.jit(_metrics, out_shardings=replicated),
                 model_axis=model_axis if two_d else None, state_shardings=state_shardings)


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
