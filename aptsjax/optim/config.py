"""Settings per method: ``TrustRegionConfig`` (constants and options of one trust region) and
``APTSConfig`` (APTS's options, holding the ``TrustRegionConfig`` of its global region).

The trust-region constants hold no learning rate; the one learning rate is ``local_lr``, read
only by the optional Adam local solver (``local_solver="adam"``). ``TrustRegionConfig()`` is
``aptsjax.trust_region``'s default (a general optimizer: radius floor ``GENERAL_MIN_RADIUS``,
growth only after steps that reach the boundary); ``TrustRegionConfig.paper()`` is the paper's
TR (floor 1e-3, growth after every very good step, rule (7)). ``APTSConfig()`` is
``aptsjax.apts``'s default and ``APTSConfig.paper()`` the paper's APTS exactly; where they
differ, and the validation runs that chose the defaults, is in docs/defaults.md.

Both methods take the settings the same way: ``base=`` (a config, used as it is) and keyword
overrides of its fields. ``configure_trust_region`` and ``configure_apts`` route the keywords:
a field of the other method's config (``trust_region(f, combine="sum")``) or an unknown name
raises ValueError, as does a value of the wrong type or outside the choices.
"""

from __future__ import annotations

import typing
from typing import Any, Literal, NamedTuple

import jax
import optax

from aptsjax.numerics import checks

GENERAL_MIN_RADIUS = 1e-10

RadiusGrowth = Literal["always", "boundary"]
Norm = Literal["l2", "rms"]
LocalRadius = Literal["bound", "split", "carry"]
Combine = Literal["sum", "mean"]
LocalMethod = Literal["trust_region", "adam", "adam_tr"]
BlockBound = Literal["equal", "size"]
RadiusUnits = Literal["absolute", "per_parameter"]


MINIMUM = {"local_steps": 1, "global_steps": 0}  # the integer options and their least values


class TrustRegionConfig(NamedTuple):
  """The constants and options of one trust region (the paper's (2) and (7)).

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
    radius_growth: ``"always"`` (the paper's (7)) or ``"boundary"`` (Nocedal and Wright,
      Algorithm 4.1: growing after an interior step enlarges a region that did not constrain
      the step).
    norm: ``"l2"`` (the paper: |s|_2 <= Delta) or ``"rms"`` (|D s|_2 <= Delta with D diagonal
      from an RMS of past gradients, ``aptsjax.numerics.scaling``).
    rms_decay: the decay of the squared-gradient average behind ``norm="rms"`` (Adam's beta2).
    rms_eps: added to the RMS before it is normalised (Adam's eps).
  """
  init_radius: float = 0.01
  min_radius: float = GENERAL_MIN_RADIUS
  max_radius: float = 4.0
  eta_accept: float = 0.0
  eta1: float = 0.25
  eta2: float = 0.75
  alpha: float = 0.5
  beta: float = 2.0
  radius_growth: RadiusGrowth = "boundary"
  norm: Norm = "l2"
  rms_decay: float = 0.999
  rms_eps: float = 1e-8

  @classmethod
  def paper(cls) -> "TrustRegionConfig":
    """The paper's trust region: Delta_min = 1e-3, growth after every very good step (7)."""
    return cls(min_radius=1e-3, radius_growth="always")

  def validate(self) -> "TrustRegionConfig":
    """Returns self, or raises ValueError for an inconsistent table or a value off its choices."""
    if not 0.0 < self.min_radius <= self.init_radius <= self.max_radius:
      raise ValueError("need 0 < min_radius <= init_radius <= max_radius, got "
                       f"{self.min_radius}, {self.init_radius}, {self.max_radius}.")
    if not 0.0 <= self.eta_accept <= self.eta1 <= self.eta2 < 1.0:
      raise ValueError("need 0 <= eta_accept <= eta1 <= eta2 < 1, got "
                       f"{self.eta_accept}, {self.eta1}, {self.eta2}.")
    if not (0.0 < self.alpha < 1.0 < self.beta):
      raise ValueError(f"need 0 < alpha < 1 < beta, got alpha={self.alpha}, beta={self.beta}.")
    if not (0.0 <= self.rms_decay < 1.0 and self.rms_eps > 0.0):
      raise ValueError(f"need 0 <= rms_decay < 1 and rms_eps > 0, got {self.rms_decay}, "
                       f"{self.rms_eps}.")
    _check_choices(self)
    return self

  def scaled(self, factor: float) -> "TrustRegionConfig":
    """The table with every radius divided by ``factor`` (APTS local regions: Delta / N)."""
    return self._replace(init_radius=self.init_radius / factor,
                         min_radius=self.min_radius / factor, max_radius=self.max_radius / factor)


class APTSConfig(NamedTuple):
  """The options of ``aptsjax.apts`` and the trust region of its global phase.

  Attributes:
    trust_region: the global region's constants and options (the paper's by default; the local
      regions use them divided by N for ``combine="sum"``, as they are for ``"mean"``).
    combine: the APTS step from the local steps: ``"sum"`` (the paper: s~ = sum_i s_i, each
      |s_i| <= Delta / N) or ``"mean"`` (s~ = the mean of the s_i, each |s_i| <= Delta).
    local_solver: the local iterations: ``"trust_region"`` (the paper's local TR), ``"adam"``
      (``optax.adam(local_lr)`` projected into the local region), ``"adam_tr"`` (Adam's
      direction with the local trust region's length, no learning rate), any optax
      ``GradientTransformation`` (projected the same way) or a ``aptsjax.LocalSolver``.
    local_lr: the learning rate of ``local_solver="adam"`` (Adam's own default; the region
      bounds the steps); read only for that choice.
    local_radius: where each update's local radius starts: ``"bound"`` (the paper: at the
      local bound), ``"split"`` (at the bound / ``local_steps``) or ``"carry"`` (where the
      subdomain's last update left it, at most the bound; the first update as ``"split"``);
      read by the trust-region and ``"adam_tr"`` local solvers.
    local_steps: nu, the most local iterations per update (>= 1).
    global_steps: global TR iterations after the APTS step (>= 0; the paper: 1), or None: 1 on
      a plain batch, 0 on a ``aptsjax.data.Stream`` (``steps_after``).
    block_bound: how the local bound is split over J parameter blocks
      (``aptsjax.optim.blocks.divisors``): ``"equal"`` (/ sqrt(J)) or ``"size"`` (x sqrt(n_j/n)).
    consistency: whether the local objectives carry the first-order consistency term
      <g^k - g_i, theta - theta^k> (3)-(4) (the paper). False: each subdomain minimises its own
      loss, as local SGD and DiLoCo do, and with a ``Stream`` and a first-order global phase of
      no steps an update all-reduces no gradient at all. None: True on a plain batch, False on
      a ``Stream`` (``resolve``; docs/method.md, "Streams").
    radius_units: what the radii of ``trust_region`` measure: ``"absolute"`` (the paper: the
      Euclidean length |s|_2) or ``"per_parameter"`` (the root mean square of the step's
      coordinates, |s|_2 / sqrt(n) for n parameters: the radii are multiplied by sqrt(n) when
      the parameters are known, so one table fits models of any size, as a per-coordinate step
      size does; ``state.radius`` holds the Euclidean radius).
    outer_momentum: mu in [0, 1): the step judged by the global test is s~ plus mu times the
      last accepted APTS step, cut to the region (``aptsjax.optim.outer``); 0 (the paper): s~.
  """
  trust_region: TrustRegionConfig = TrustRegionConfig(min_radius=1e-6, radius_growth="always")
  combine: Combine = "mean"
  local_solver: Any = "adam_tr"
  local_lr: float = 1e-3
  local_radius: LocalRadius = "carry"
  local_steps: int = 5
  global_steps: int | None = None
  block_bound: BlockBound = "equal"
  consistency: bool | None = None
  radius_units: RadiusUnits = "per_parameter"
  outer_momentum: float = 0.0

  @classmethod
  def paper(cls) -> "APTSConfig":
    """The paper's APTS exactly: the summed local TR steps, each within Delta / N, radii in
    Euclidean lengths (``TrustRegionConfig.paper()``), one global step."""
    return cls(trust_region=TrustRegionConfig.paper(), combine="sum",
               local_solver="trust_region", local_radius="bound", global_steps=1,
               consistency=True, radius_units="absolute")

  def steps_after(self, streaming: bool) -> int:
    """The global steps an update takes: ``global_steps``, or when None 1 on a plain batch and
    0 on a ``aptsjax.data.Stream`` (docs/method.md, "Global steps")."""
    if self.global_steps is not None:
      return self.global_steps
    return 0 if streaming else 1

  def resolve(self, streaming: bool) -> "APTSConfig":
    """The options an update on a plain batch (``streaming=False``) or on a ``Stream`` runs:
    ``global_steps`` as ``steps_after``, ``consistency`` when None True on a plain batch and
    False on a stream (docs/method.md, "Streams")."""
    consistency = (not streaming) if self.consistency is None else self.consistency
    return self._replace(global_steps=self.steps_after(streaming), consistency=consistency)

  def validate(self) -> "APTSConfig":
    """Returns self, or raises ValueError for a value of the wrong type or off its choices."""
    if not isinstance(self.trust_region, TrustRegionConfig):
      raise ValueError("trust_region must be an aptsjax.TrustRegionConfig, got "
                       f"{type(self.trust_region).__name__}.")
    self.trust_region.validate()
    for name, minimum in MINIMUM.items():
      if getattr(self, name) is not None or name != "global_steps":
        checks.as_int(name, getattr(self, name), minimum)
    if not (self.consistency is None or isinstance(self.consistency, bool)):
      raise ValueError(f"consistency must be True, False or None, got {self.consistency!r}.")
    if not 0.0 <= self.outer_momentum < 1.0:
      raise ValueError(f"need 0 <= outer_momentum < 1, got {self.outer_momentum}.")
    if not self.local_lr > 0.0:
      raise ValueError(f"need local_lr > 0, got {self.local_lr}.")
    if not (self.local_solver in typing.get_args(LocalMethod) or _is_solver(self.local_solver)):
      raise ValueError(f"local_solver must be one of {typing.get_args(LocalMethod)}, an optax "
                       "GradientTransformation or an aptsjax.LocalSolver, got "
                       f"{self.local_solver!r}.")
    _check_choices(self)
    return self


def _is_solver(value: Any) -> bool:
  """An optax transformation or a LocalSolver (both have ``init``; checked structurally)."""
  return (isinstance(value, optax.GradientTransformation)
          or (callable(getattr(value, "init", None)) and callable(getattr(value, "step", None))))


def choices(config_type: type) -> dict[str, tuple[str, ...]]:
  """The ``Literal`` fields of a config class and their allowed values."""
  hints = typing.get_type_hints(config_type)
  return {name: typing.get_args(hint) for name, hint in hints.items()
          if typing.get_origin(hint) is Literal}


def _check_choices(config: NamedTuple) -> None:
  for name, allowed in choices(type(config)).items():
    if getattr(config, name) not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}.")


INJECT_MESSAGE = (
    "the trust-region constants and options are Python values fixed when the transformation is "
    "built (they are validated and select code paths), so optax.inject_hyperparams, which "
    "passes them as traced arrays, is not supported. Build a new transformation to change a "
    "constant; the radius itself is state: state._replace(radius=...).")


def _coerce(config_type: type, name: str, value: Any) -> Any:
  """``value`` for field ``name``: a choice stays a string, a count an int, a constant a float.

  Raises:
    ValueError: a wrong type, or a traced value (``optax.inject_hyperparams``).
  """
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name}: {INJECT_MESSAGE}")
  hint = typing.get_type_hints(config_type)[name]
  if typing.get_origin(hint) is Literal:
    if not isinstance(value, str):
      raise ValueError(f"{name} must be one of {typing.get_args(hint)}, got {value!r}.")
    return value
  if hint is int or (name == "global_steps" and value is not None):
    return checks.as_int(name, value, MINIMUM.get(name, 0))
  if hint is float:
    if isinstance(value, (str, bool)) or not isinstance(value, (int, float)):
      raise ValueError(f"{name} must be a number, got {value!r}.")
    return float(value)
  return value


def _fields(config_type: type) -> tuple[str, ...]:
  return tuple(f for f in config_type._fields if f != "trust_region")


def _check_names(options: dict[str, Any], known: tuple[str, ...], method: str,
                 foreign: dict[str, str]) -> None:
  for name in options:
    if name in known:
      continue
    if name == "options" and isinstance(options[name], dict):   # optax.inject_hyperparams
      raise ValueError(f"{method}: {INJECT_MESSAGE}")
    if name in foreign:
      raise ValueError(f"{name!r} is an option of {foreign[name]}, not of {method}.")
    raise ValueError(f"unknown {method} option {name!r}; known: {list(known)}.")


def configure_trust_region(base: TrustRegionConfig | None = None, **options: Any
                           ) -> TrustRegionConfig:
  """``base`` (default ``TrustRegionConfig()``) with keyword overrides, validated.

  Raises:
    ValueError: ``base`` is not a ``TrustRegionConfig``; an option of APTS or an unknown name;
      a wrong type (a number for a choice, a string for a constant); an inconsistent table.
  """
  base = TrustRegionConfig() if base is None else base
  if not isinstance(base, TrustRegionConfig):
    raise ValueError(f"base must be an aptsjax.TrustRegionConfig, got {type(base).__name__}"
                     " (an APTSConfig configures aptsjax.apts).")
  foreign = {name: "aptsjax.apts (APTSConfig)" for name in _fields(APTSConfig)}
  _check_names(options, TrustRegionConfig._fields, "trust_region", foreign)
  values = {k: _coerce(TrustRegionConfig, k, v) for k, v in options.items()}
  return base._replace(**values).validate()


def configure_apts(base: APTSConfig | None = None, **options: Any) -> APTSConfig:
  """``base`` (default ``APTSConfig()``) with keyword overrides of its fields and of its
  ``trust_region``'s fields, validated.

  Raises:
    ValueError: ``base`` is not an ``APTSConfig``; an unknown name; a wrong type; an
      inconsistent table.
  """
  base = APTSConfig() if base is None else base
  if not isinstance(base, APTSConfig):
    raise ValueError(f"base must be an aptsjax.APTSConfig, got {type(base).__name__} (a "
                     "TrustRegionConfig goes in APTSConfig(trust_region=...)).")
  if not isinstance(base.trust_region, TrustRegionConfig):
    raise ValueError("base.trust_region must be an aptsjax.TrustRegionConfig, got "
                     f"{type(base.trust_region).__name__}.")
  _check_names(options, _fields(APTSConfig) + TrustRegionConfig._fields, "apts", {})
  own = {k: _coerce(APTSConfig, k, v) for k, v in options.items() if k in APTSConfig._fields}
  region = {k: _coerce(TrustRegionConfig, k, v) for k, v in options.items()
            if k in TrustRegionConfig._fields}
  return base._replace(trust_region=base.trust_region._replace(**region), **own).validate()
