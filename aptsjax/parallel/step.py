"""The jitted APTS train step of ``aptsjax.parallel.apts_trainer``: ``TrainStep``.

Reporting an update skipped for a non-finite loss or gradient (``on_nonfinite``), donation of
the params and state a step is given (their buffers are reused for the results), and the
lowering of the step for HLO inspection.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aptsjax.optim.guard import nonfinite_message
from aptsjax.optim.guard import report_nonfinite

PyTree = Any


NONFINITE_ACTIONS = ("warn", "raise", "ignore")


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
  ``"raise"`` after it (waiting for the step), ``"ignore"`` not.
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
    if self._place is not None:
      params = self._place(params)
    params, state = distinct((params, state))
    params, state = self.jitted(params, state)(params, state, batch)
    if self._on_nonfinite == "raise" and bool(np.asarray(state.nonfinite)):  # waits for the step
      raise FloatingPointError(nonfinite_message(int(np.asarray(state.iteration))))
    return params, state

  def lower(self, params: PyTree, state: NamedTuple, batch: Any) -> jax.stages.Lowered:
    """The step lowered for these arguments (params placed as ``place`` would), for HLO
    inspection (``.compile().as_text()``, ``aptsjax.tools.comm``); donates nothing."""
    return self.jitted(params, state).lower(params, state, batch)
