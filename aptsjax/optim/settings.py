"""The trust-region constants and options (one table, no learning rate) and the radius rules.

``Hyperparams()`` holds the library's defaults; ``Hyperparams.paper()`` is the paper's method
exactly. The two differ only in the options that the study in ``benchmarks/ablation.py`` chose
on a validation split (``combine="mean"``, ``local_method="adam"``; docs/method.md, "Defaults").
The options (docs/method.md, "Options beyond the paper"):

* ``radius_growth``: when the radius grows after a very good step (rho > eta2): always, as the
  paper's (7), or only when the step reached the boundary of the region (Nocedal and Wright,
  Algorithm 4.1; scipy's trust-region methods). Growing after an interior step enlarges a region
  that did not constrain the step, so the next constrained step can overshoot.
* ``norm``: the region |s|_2 <= Delta (the paper) or the scaled region |D s|_2 <= Delta with D
  diagonal from an RMS of past gradients (``aptsjax.scaling``).
* ``local_radius``: the APTS local radius starts at the local bound Delta / N (the paper) or at
  Delta / (N nu), so that nu local steps fit the bound and grow by the local TR rules.
* ``combine``: APTS's step is the sum of the local steps, each within Delta / N (the paper), or
  their mean, each within Delta.
* ``local_method``: APTS's local solver is trust region (the paper) or Adam steps projected into
  the local region.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

GENERAL_MIN_RADIUS = 1e-10

CHOICES = {"radius_growth": ("always", "boundary"), "norm": ("l2", "rms"),
           "local_radius": ("bound", "split"), "combine": ("sum", "mean"),
           "local_method": ("trust_region", "adam")}

BOUNDARY_FRACTION = 1e-3  # a step is on the boundary when |s| >= (1 - this) * radius.


class Hyperparams(NamedTuple):
  """The trust-region constants and options: one table for every problem (no learning rate).

  The radii, thresholds and factors are the paper's (docs/method.md, "Defaults"); the options
  default to the choices of the validation study (``benchmarks/ablation.py``): the mean of the
  local steps and the Adam local solver, the rest as the paper. ``Hyperparams.paper()`` is the
  paper's method. ``aptsjax.apts`` uses the table as it is; ``aptsjax.trust_region`` (with no
  ``base``) lowers ``min_radius`` to ``GENERAL_MIN_RADIUS`` so that it can converge to tight
  gradient tolerances as a general optimizer, and grows the radius only after boundary steps
  (pass ``base=Hyperparams.paper(), min_radius=1e-3`` for the paper's plain TR).

  Attributes:
    init_radius: Delta_0, the initial radius.
    min_radius: Delta_min, the floor of the radius (a first-order step is never shorter).
    max_radius: Delta_max, the ceiling of the radius.
    eta_accept: accept the step iff rho > eta_accept (the authors' code: any decrease).
    eta1: shrink the radius iff rho < eta1.
    eta2: grow the radius iff rho > eta2 (and, for ``radius_growth="boundary"``, the step
      reached the boundary).
    alpha: shrink factor.
    beta: growth factor.
    radius_growth: ``"always"`` (the paper's (7)) or ``"boundary"``.
    norm: ``"l2"`` (the paper) or ``"rms"`` (|D s| <= Delta, ``aptsjax.scaling``).
    rms_decay: the decay of the squared-gradient average behind ``norm="rms"`` (Adam's beta2).
    rms_eps: added to the RMS before it is normalised (Adam's eps).
    local_radius: ``"bound"`` (the paper: the APTS local radius starts at Delta / N) or
      ``"split"`` (it starts at Delta / (N nu)).
    combine: how APTS combines the local steps: ``"sum"`` (the paper: s~ = sum_i s_i, each
      |s_i| <= Delta / N) or ``"mean"`` (s~ = the mean of the s_i, each |s_i| <= Delta).
    local_method: APTS's local solver when none is given: ``"trust_region"`` (the paper) or
      ``"adam"`` (``aptsjax.optax_local_solver(optax.adam(local_lr))``).
    local_lr: the learning rate of ``local_method="adam"`` (Adam's own default, 1e-3; the
      region bounds the steps).
  """
  init_radius: float = 0.01
  min_radius: float = 0.001
  max_radius: float = 4.0
  eta_accept: float = 0.0
  eta1: float = 0.25
  eta2: float = 0.75
  alpha: float = 0.5
  beta: float = 2.0
  radius_growth: str = "always"
  norm: str = "l2"
  rms_decay: float = 0.999
  rms_eps: float = 1e-8
  local_radius: str = "bound"
  combine: str = "mean"
  local_method: str = "adam"
  local_lr: float = 1e-3

  @classmethod
  def paper(cls) -> "Hyperparams":
    """The paper's method exactly: rule (7), the Euclidean region, local radius Delta / N."""
    return cls(radius_growth="always", norm="l2", local_radius="bound", combine="sum",
               local_method="trust_region")

  def validate(self) -> "Hyperparams":
    """Returns self, or raises ValueError for an inconsistent table."""
    if not 0.0 < self.min_radius <= self.init_radius <= self.max_radius:
      raise ValueError("need 0 < min_radius <= init_radius <= max_radius, got "
                       f"{self.min_radius}, {self.init_radius}, {self.max_radius}.")
    if not 0.0 <= self.eta_accept <= self.eta1 <= self.eta2 < 1.0:
      raise ValueError("need 0 <= eta_accept <= eta1 <= eta2 < 1, got "
                       f"{self.eta_accept}, {self.eta1}, {self.eta2}.")
    if not (0.0 < self.alpha < 1.0 < self.beta):
      raise ValueError(f"need 0 < alpha < 1 < beta, got alpha={self.alpha}, beta={self.beta}.")
    if not self.local_lr > 0.0:
      raise ValueError(f"need local_lr > 0, got {self.local_lr}.")
    if not (0.0 <= self.rms_decay < 1.0 and self.rms_eps > 0.0):
      raise ValueError(f"need 0 <= rms_decay < 1 and rms_eps > 0, got {self.rms_decay}, "
                       f"{self.rms_eps}.")
    for name, allowed in CHOICES.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
    return self

  def scaled(self, factor: float) -> "Hyperparams":
    """The table with every radius divided by ``factor`` (APTS local regions: Delta / N)."""
    return self._replace(init_radius=self.init_radius / factor,
                         min_radius=self.min_radius / factor, max_radius=self.max_radius / factor)


def make_hyperparams(base: Hyperparams | None = None, **overrides: float | str) -> Hyperparams:
  """``base`` (default ``Hyperparams()``) with keyword overrides, validated.

  Raises:
    ValueError: for an unknown name, a wrong type (a number for an option, a string for a
      constant) or an inconsistent table.
  """
  base = Hyperparams() if base is None else base
  if not isinstance(base, Hyperparams):
    raise ValueError(f"base must be an aptsjax.Hyperparams, got {type(base).__name__}.")
  unknown = set(overrides) - set(Hyperparams._fields)
  if unknown:
    raise ValueError(f"unknown trust-region option(s) {sorted(unknown)}; "
                     f"known: {list(Hyperparams._fields)}.")
  values = {}
  for name, value in overrides.items():
    if name in CHOICES:
      if not isinstance(value, str):
        raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}.")
      values[name] = value
    else:
      if isinstance(value, (str, bool)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
      values[name] = float(value)
  return base._replace(**values).validate()


def ratio_test(actual: jax.Array, predicted: jax.Array, hp: Hyperparams,
               on_boundary: jax.Array | bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Acceptance and radius decisions from the actual and predicted reductions.

  Args:
    actual: f(theta) - f(theta + s); non-finite counts as rho = -inf.
    predicted: -m(s); a value <= 0 or non-finite counts as rho = -inf.
    hp: the thresholds and ``radius_growth``.
    on_boundary: whether the step reached the boundary of its region (only read for
      ``radius_growth="boundary"``).

  Returns:
    ``(accept, shrink, grow)`` bool scalars.
  """
  ok = (predicted > 0) & jnp.isfinite(predicted) & jnp.isfinite(actual)
  accept = ok & (actual > hp.eta_accept * predicted)
  shrink = ~(ok & (actual >= hp.eta1 * predicted))
  grow = ok & (actual > hp.eta2 * predicted)
  if hp.radius_growth == "boundary":
    grow = grow & jnp.asarray(on_boundary)
  return accept, shrink, grow


def update_radius(radius: jax.Array, shrink: jax.Array, grow: jax.Array, hp: Hyperparams
                  ) -> jax.Array:
  """The radius update (7): grow by beta up to max_radius, shrink by alpha down to min_radius."""
  grown = jnp.minimum(hp.beta * radius, hp.max_radius)
  shrunk = jnp.maximum(hp.alpha * radius, hp.min_radius)
  return jnp.where(grow, grown, jnp.where(shrink, shrunk, radius)).astype(radius.dtype)


def reaches_boundary(step_norm: jax.Array, radius: jax.Array) -> jax.Array:
  """Whether a step of length ``step_norm`` lies on the boundary of a region of ``radius``."""
  return step_norm >= (1.0 - BOUNDARY_FRACTION) * radius
