"""Tests of the trust-region options: the ``Hyperparams`` table, ``radius_growth``,
``local_radius`` and the optax local solver (the scaled region: tests/test_options_scaling.py).

Expectations are computed by hand or with numpy (float64), never with aptsjax itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax import local
from aptsjax.apts import local_objective
from aptsjax.hyperparams import Hyperparams, make_hyperparams, ratio_test, reaches_boundary
from tests.test_apts import assert_close, mlp_loss, problem
from tests.test_trust_region import quadratic, rosenbrock, X0

# ----------------------------------------------------------------------------
# make_hyperparams and Hyperparams.paper


def test_make_hyperparams_accepts_the_options():
  hp = make_hyperparams(radius_growth="boundary", norm="rms", local_radius="split",
                        rms_decay=0.9, rms_eps=1e-6, eta2=0.8)
  assert (hp.radius_growth, hp.norm, hp.local_radius) == ("boundary", "rms", "split")
  assert (hp.rms_decay, hp.rms_eps, hp.eta2) == (0.9, 1e-6, 0.8)
  assert make_hyperparams() == Hyperparams()
  base = Hyperparams(init_radius=0.5, norm="rms")
  assert make_hyperparams(base, eta1=0.1) == base._replace(eta1=0.1)


@pytest.mark.parametrize("name, allowed", [("radius_growth", ("always", "boundary")),
                                           ("norm", ("l2", "rms")),
                                           ("local_radius", ("bound", "split"))])
def test_make_hyperparams_rejects_bad_option_values(name, allowed):
  for value in ("sometimes", allowed[0].upper(), 1, 1.0, None, True):
    with pytest.raises(ValueError) as info:
      make_hyperparams(**{name: value})
    assert name in str(info.value)
    assert all(repr(a) in str(info.value) for a in allowed), str(info.value)


def test_make_hyperparams_rejects_bad_constants():
  with pytest.raises(ValueError, match="eta1 must be a number"):
    make_hyperparams(eta1="0.25")
  with pytest.raises(ValueError, match="init_radius must be a number"):
    make_hyperparams(init_radius=True)
  with pytest.raises(ValueError, match="unknown"):
    make_hyperparams(learning_rate=0.1)
  with pytest.raises(ValueError, match="base"):
    make_hyperparams({"init_radius": 0.1})
  for kwargs in ({"rms_decay": 1.0}, {"rms_decay": -0.1}, {"rms_decay": 2.0},
                 {"rms_eps": 0.0}, {"rms_eps": -1e-8}, {"rms_decay": float("nan")}):
    with pytest.raises(ValueError, match="rms_decay"):
      make_hyperparams(**kwargs)
    with pytest.raises(ValueError, match="rms_decay"):
      aptsjax.trust_region(quadratic, norm="rms", **kwargs)
    with pytest.raises(ValueError, match="rms_decay"):
      aptsjax.apts(mlp_loss, norm="rms", **kwargs)


def test_paper_table():
  hp = Hyperparams.paper()
  assert (hp.radius_growth, hp.norm, hp.local_radius) == ("always", "l2", "bound")
  assert (hp.init_radius, hp.min_radius, hp.max_radius) == (0.01, 1e-3, 4.0)
  assert (hp.eta_accept, hp.eta1, hp.eta2) == (0.0, 0.25, 0.75)
  assert (hp.alpha, hp.beta) == (0.5, 2.0)
  assert hp.validate() is hp


def test_base_is_respected():
  """A base table sets the initial radius, the ceiling and the norm of both transformations."""
  base = Hyperparams(init_radius=0.05, max_radius=0.05, norm="rms")
  x = jnp.asarray(X0, jnp.float32)
  tx = aptsjax.trust_region(quadratic, second_order=False, base=base)
  state = tx.init(x)
  assert float(state.radius) == pytest.approx(0.05) and state.scaling is not None
  _, state = tx.update(jax.grad(quadratic)(x), state, x)
  # A short first-order step on a quadratic: rho ~ 1 > eta2, but the ceiling is the base's.
  assert bool(state.accepted)
  assert float(state.actual_reduction) > 0.75 * float(state.predicted_reduction)
  assert float(state.radius) == pytest.approx(0.05)
  params, batch = problem()
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=1, second_order=False, base=base)
  state = tx.init(params)
  assert float(state.radius) == pytest.approx(0.05) and state.scaling is not None
  _, state = tx.update(None, state, params, batch=batch)
  assert float(state.radius) <= 0.05 * (1 + 1e-7)
  # An override beats the base.
  assert aptsjax.apts(mlp_loss, base=base, norm="l2").init(params).scaling is None


# ----------------------------------------------------------------------------
# ratio_test with radius_growth, reaches_boundary


@pytest.mark.parametrize("growth, on_boundary, grows", [
    ("always", True, True), ("always", False, True),
    ("boundary", True, True), ("boundary", False, False)])
def test_ratio_test_growth_rule(growth, on_boundary, grows):
  hp = Hyperparams(radius_growth=growth)
  for edge in (on_boundary, jnp.array(on_boundary)):
    accept, shrink, grow = jax.jit(lambda a, p, e: ratio_test(a, p, hp, e))(
        jnp.float32(0.9), jnp.float32(1.0), edge)
    assert (bool(accept), bool(shrink), bool(grow)) == (True, False, grows)
  # Whatever on_boundary says, a moderate or bad ratio never grows the radius.
  for actual, expected in ((0.5, (True, False, False)), (-1.0, (False, True, False))):
    out = ratio_test(jnp.float32(actual), jnp.float32(1.0), hp, jnp.array(on_boundary))
    assert tuple(bool(v) for v in out) == expected


def test_reaches_boundary(x64):
  radius = 2.0
  threshold = (1.0 - 1e-3) * radius
  cases = {radius: True, 1.5 * radius: True, threshold: True,
           np.nextafter(threshold, 0.0): False, 0.5 * radius: False, 0.0: False}
  for norm, expected in cases.items():
    got = reaches_boundary(jnp.float64(norm), jnp.float64(radius))
    assert bool(got) == expected, norm


# ----------------------------------------------------------------------------
# trust_region with radius_growth: the radius trajectory against a numpy re-implementation


def radius_rule(radius, rho, step_norm, growth, hp=Hyperparams()):
  """The radius update (7) in numpy; for "boundary" growth needs |s| = radius.

  Returns None when the step length is too close to the boundary fraction to classify.
  """
  on_boundary = step_norm >= (1 - 1e-9) * radius
  if growth == "boundary" and rho > hp.eta2 and not on_boundary and step_norm > (1 - 2e-3) * radius:
    return None
  if rho > hp.eta2 and (growth == "always" or on_boundary):
    return min(hp.beta * radius, hp.max_radius)
  if rho < hp.eta1:
    return max(hp.alpha * radius, 1e-10)
  return radius


@pytest.mark.parametrize("growth", ["always", "boundary"])
def test_trust_region_radius_growth(x64, growth):
  """Second-order TR on Rosenbrock: every radius update follows the rule of ``growth``; some
  accepted interior steps with rho > eta2 happen, which grow the radius only for "always"."""
  tx = aptsjax.trust_region(rosenbrock, memory=3, init_radius=0.1, radius_growth=growth)
  update = jax.jit(tx.update)
  x = {"u": jnp.full((2,), -1.2), "v": jnp.full((2,), 1.0)}
  state = tx.init(x)
  interior_good = 0
  for _ in range(14):
    radius = float(state.radius)
    updates, state = update(jax.grad(rosenbrock)(x), state, x)
    rho = float(state.actual_reduction) / float(state.predicted_reduction)
    step_norm = float(optax.tree.norm(updates))   # 0 for a rejected step (which has rho <= 0)
    expected = radius_rule(radius, rho, step_norm, growth)
    assert expected is not None
    assert float(state.radius) == pytest.approx(expected, rel=1e-12)
    if bool(state.accepted) and rho > 0.75 and step_norm < (1 - 1e-3) * radius:
      interior_good += 1
      assert (float(state.radius) > radius) == (growth == "always")
    x = optax.apply_updates(x, updates)
  assert interior_good >= 2
