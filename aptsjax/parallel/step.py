"""The jitted APTS train step of ``aptsjax.parallel.apts_trainer``: ``TrainStep``.

Reporting an update skipped for a non-finite loss or gradient (``on_nonfinite``), donation of
the params and state a step is given (their buffers are reused for the results), a one-time
warning when a new batch shape compiles the step again, and the lowering of the step for HLO
inspection.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aptsjax.optim.guard import nonfinite_message
from aptsjax.optim.guard import report_nonfinite

PyTree = Any


NONFINITE_ACTIONS = ("warn", "raise", "ignore")


def batch_shapes(batch: Any) -> str:
  """The shapes and dtypes of a batch's leaves, as ``float32[2,256,4]``; what a compiled step
  is specialised to."""
  def describe(x):
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    return f"{np.dtype(dtype).name}[{','.join(str(d) for d in np.shape(x))}]"

  return ", ".join(describe(x) for x in jax.tree.leaves(batch))


def _buffer(x: Any) -> Any:
  """What identifies ``x``'s memory: its first device buffer (the object itself for tracers)."""
  try:
    return x.addressable_data(0).unsafe_buffer_pointer()
  except Exception:  # pylint: disable=broad-exception-caught  (tracers, host arrays)
    return id(x)


def distinct(tree: PyTree) -> PyTree:
  """``tree`` with every array that shares its buffer with an earlier leaf copied.

  A donated argument may not hold the same buffer twice; states built eagerly can (one array
  of zeros for several fields, which ``jax.device_put`` places once). ``init`` and ``step``
  apply it, so any state works.
  """
  seen: set[Any] = set()

  def fresh(x):
    if not isinstance(x, jax.Array):
      return x
    key = _buffer(x)
    if key in seen:
      return jnp.copy(x)
    seen.add(key)
    return x

  return jax.tree.map(fresh, tree)


class TrainStep:
  """A jitted train step ``(params, state, batch) -> (params, state)`` and its lowering.

  ``fn`` (un-jitted, e.g. one APTS update) is jitted now, or, given ``out_shardings``
  (``(params, state) -> shardings``, which may need the parameter specs), at the first call or
  ``lower``, and kept for every later call. A call places the params (``place``), copies
  buffers shared by two leaves (``distinct``), donates the params and state, and reports a
  skipped update as ``on_nonfinite`` says: ``"warn"`` from a host callback inside the step,
  ``"raise"`` after it (waiting for the step), ``"ignore"`` not. The first call with a batch
  of other shapes than the first batch's (which compiles the step again, 1-3 s each) issues a
  ``UserWarning``, once per ``TrainStep``.
  """

  def __init__(self, fn: Callable[..., tuple[PyTree, NamedTuple]], on_nonfinite: str = "warn",
               compiler_options: dict[str, Any] | None = None,
               place: Callable[[PyTree], PyTree] | None = None,
               out_shardings: Callable[[PyTree, NamedTuple], Any] | None = None):
    if on_nonfinite not in NONFINITE_ACTIONS:
      raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}.")
    self._fn, self._on_nonfinite = fn, on_nonfinite
    self._options = dict(compiler_options or {})
    self._place = place
    self._out_shardings = out_shardings
    self._jitted = None if out_shardings is not None else self._jit()
    self._batch_shapes: str | None = None  # the first batch's
    self._reshaped = False  # a batch of other shapes was reported

  def _run(self, params, state, batch):  # what is jitted: the step with the in-step report
    params, state = self._fn(params, state, batch)
    if self._on_nonfinite == "warn":
      report_nonfinite(state)
    return params, state

  def _jit(self, **kwargs: Any) -> Any:
    return jax.jit(self._run, donate_argnums=(0, 1), compiler_options=self._options, **kwargs)

  def jitted(self, params: PyTree, state: NamedTuple) -> Any:
    """The jitted step (donating its params and state); with ``out_shardings``, built from
    these params and state at the first use."""
    if self._jitted is None:
      self._jitted = self._jit(out_shardings=self._out_shardings(params, state))
    return self._jitted

  def __call__(self, params: PyTree, state: NamedTuple, batch: Any) -> tuple[PyTree, NamedTuple]:
    self._check_batch(batch)
    if self._place is not None:
      params = self._place(params)
    params, state = distinct((params, state))
    params, state = self.jitted(params, state)(params, state, batch)
    if self._on_nonfinite == "raise" and bool(np.asarray(state.nonfinite)):  # waits for the step
      raise FloatingPointError(nonfinite_message(int(np.asarray(state.iteration))))
    return params, state

  def _check_batch(self, batch: Any) -> None:
    """Warns (once) when ``batch`` has other shapes than the first batch: a new compilation."""
    if self._reshaped:
      return
    shapes = batch_shapes(batch)
    if self._batch_shapes is None:
      self._batch_shapes = shapes
    elif shapes != self._batch_shapes:
      warnings.warn(
          f"trainer.step got a batch of shapes ({shapes}) after ({self._batch_shapes}): the "
          "step is compiled again for every new batch shape (1-3 s each). Give every step "
          "the same number of rows: pad the last partial batch, or drop it "
          "(aptsjax.data.iterate_minibatches drops it; aptsjax.data.trim_rows cuts a batch "
          "to a multiple of a size). Warned once per trainer.", UserWarning, stacklevel=3)
      self._reshaped = True

  def lower(self, params: PyTree, state: NamedTuple, batch: Any) -> jax.stages.Lowered:
    """The step lowered for these arguments (params placed as ``place`` would), for HLO
    inspection (``.compile().as_text()``, ``aptsjax.tools.comm``); donates nothing."""
    return self.jitted(params, state).lower(params, state, batch)
