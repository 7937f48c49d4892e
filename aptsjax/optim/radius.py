"""The trust-region decisions: the ratio test and the radius update (7) of the paper.

The ratio rho = actual / predicted is evaluated as comparisons (no division): accept iff
predicted > 0 and actual > eta_accept * predicted; shrink unless predicted > 0 and actual >=
eta1 * predicted; grow iff predicted > 0 and actual > eta2 * predicted (and, with
``radius_growth="boundary"``, the step reached the boundary). A non-positive or non-finite
predicted reduction, or a non-finite actual one, therefore means rejection and a smaller radius.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aptsjax.optim.config import TrustRegionConfig

BOUNDARY_FRACTION = 1e-3  # a step is on the boundary when |s| >= (1 - this) * radius.


def ratio_test(actual: jax.Array, predicted: jax.Array, cfg: TrustRegionConfig,
               on_boundary: jax.Array | bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Acceptance and radius decisions from the actual and predicted reductions.

  Args:
    actual: f(theta) - f(theta + s); non-finite counts as rho = -inf.
    predicted: -m(s); a value <= 0 or non-finite counts as rho = -inf.
    cfg: the thresholds and ``radius_growth``.
    on_boundary: whether the step reached the boundary of its region (only read for
      ``radius_growth="boundary"``).

  Returns:
    ``(accept, shrink, grow)`` bool scalars.
  """
  ok = (predicted > 0) & jnp.isfinite(predicted) & jnp.isfinite(actual)
  accept = ok & (actual > cfg.eta_accept * predicted)
  shrink = ~(ok & (actual >= cfg.eta1 * predicted))
  grow = ok & (actual > cfg.eta2 * predicted)
  if cfg.radius_growth == "boundary":
    grow = grow & jnp.asarray(on_boundary)
  return accept, shrink, grow


def update_radius(radius: jax.Array, shrink: jax.Array, grow: jax.Array, cfg: TrustRegionConfig
                  ) -> jax.Array:
  """The radius update (7): grow by beta up to max_radius, shrink by alpha down to min_radius."""
  grown = jnp.minimum(cfg.beta * radius, cfg.max_radius)
  shrunk = jnp.maximum(cfg.alpha * radius, cfg.min_radius)
  return jnp.where(grow, grown, jnp.where(shrink, shrunk, radius)).astype(radius.dtype)


def reaches_boundary(step_norm: jax.Array, radius: jax.Array) -> jax.Array:
  """Whether a step of length ``step_norm`` lies on the boundary of a region of ``radius``."""
  return step_norm >= (1.0 - BOUNDARY_FRACTION) * radius
