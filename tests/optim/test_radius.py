"""Tests of aptsjax.optim.radius: the ratio test, the radius update (7) and the boundary rule.

Expectations are computed by hand, never with aptsjax itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aptsjax import TrustRegionConfig
from aptsjax.optim.radius import BOUNDARY_FRACTION
from aptsjax.optim.radius import ratio_test
from aptsjax.optim.radius import reaches_boundary
from aptsjax.optim.radius import update_radius

HP = TrustRegionConfig.paper()  # eta 0, 0.25, 0.75; alpha 0.5, beta 2; radii [1e-3, 4]
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("actual, predicted, expected", [
    (2.0, 1.0, (True, False, True)),      # rho = 2
    (1.0, 1.0, (True, False, True)),      # rho = 1
    (0.8, 1.0, (True, False, True)),      # rho = 0.8 > eta2
    (0.75, 1.0, (True, False, False)),    # rho = eta2 exactly: no growth (strict)
    (0.5, 1.0, (True, False, False)),     # 0.25 < rho < 0.75: radius kept
    (0.25, 1.0, (True, False, False)),    # rho = eta1 exactly: no shrink (shrink iff rho < eta1)
    (0.1, 1.0, (True, True, False)),      # accepted but shrinking
    (0.0, 1.0, (False, True, False)),     # zero decrease: rejected (strict accept)
    (-1.0, 1.0, (False, True, False)),    # increase
    (1.0, 0.0, (False, True, False)),     # predicted = 0
    (1.0, -1.0, (False, True, False)),    # predicted < 0
    (-1.0, -1.0, (False, True, False)),   # rho = 1 but predicted < 0
    (NAN, 1.0, (False, True, False)),     # NaN trial loss
    (INF, 1.0, (False, True, False)),     # trial loss -inf
    (-INF, 1.0, (False, True, False)),    # trial loss +inf
    (1.0, NAN, (False, True, False)),
    (1.0, INF, (False, True, False)),
])
def test_ratio_test(actual, predicted, expected):
  accept, shrink, grow = ratio_test(jnp.float32(actual), jnp.float32(predicted), HP)
  assert (bool(accept), bool(shrink), bool(grow)) == expected


def test_ratio_test_custom_thresholds():
  hp = HP._replace(eta_accept=0.1, eta1=0.3, eta2=0.9)
  cases = {0.1: (False, True, False), 0.2: (True, True, False), 0.3: (True, False, False),
           0.9: (True, False, False), 0.95: (True, False, True)}
  for rho, expected in cases.items():
    accept, shrink, grow = ratio_test(jnp.float32(rho * 8.0), jnp.float32(8.0), hp)
    assert (bool(accept), bool(shrink), bool(grow)) == expected, rho


@pytest.mark.parametrize("radius, shrink, grow, expected", [
    (1.0, False, False, 1.0),
    (1.0, True, False, 0.5),
    (1.0, False, True, 2.0),
    (3.0, False, True, 4.0),       # clipped at max_radius
    (4.0, False, True, 4.0),
    (0.0015, True, False, 0.001),  # clipped at min_radius
    (0.001, True, False, 0.001),
    (0.001, False, True, 0.002),
    (4.0, True, False, 2.0),
])
def test_update_radius(radius, shrink, grow, expected):
  new = update_radius(jnp.float32(radius), jnp.array(shrink), jnp.array(grow), HP)
  assert new.dtype == jnp.float32
  assert float(new) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------
# radius_growth and reaches_boundary


@pytest.mark.parametrize("growth, on_boundary, grows", [
    ("always", True, True), ("always", False, True),
    ("boundary", True, True), ("boundary", False, False)])
def test_ratio_test_growth_rule(growth, on_boundary, grows):
  hp = TrustRegionConfig(radius_growth=growth)
  for edge in (on_boundary, jnp.array(on_boundary)):
    accept, shrink, grow = jax.jit(lambda a, p, e: ratio_test(a, p, hp, e))(
        jnp.float32(0.9), jnp.float32(1.0), edge)
    assert (bool(accept), bool(shrink), bool(grow)) == (True, False, grows)
  # Whatever on_boundary says, a moderate or bad ratio never grows the radius.
  for actual, expected in ((0.5, (True, False, False)), (-1.0, (False, True, False))):
    out = ratio_test(jnp.float32(actual), jnp.float32(1.0), hp, jnp.array(on_boundary))
    assert tuple(bool(v) for v in out) == expected


def test_reaches_boundary(x64):
  assert BOUNDARY_FRACTION == 1e-3
  radius = 2.0
  threshold = (1.0 - 1e-3) * radius
  cases = {radius: True, 1.5 * radius: True, threshold: True,
           np.nextafter(threshold, 0.0): False, 0.5 * radius: False, 0.0: False}
  for norm, expected in cases.items():
    got = reaches_boundary(jnp.float64(norm), jnp.float64(radius))
    assert bool(got) == expected, norm
