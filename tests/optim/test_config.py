"""Tests of aptsjax.optim.config: ``TrustRegionConfig`` and ``APTSConfig``, their presets, and the
rules by which both methods take settings (``base=`` used as it is, keyword overrides of its
fields, a foreign or unknown option or a value off its choices raises).

Expectations are written out by hand, never computed with aptsjax itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aptsjax
from aptsjax import APTSConfig
from aptsjax import TrustRegionConfig
from aptsjax.optim.config import configure_apts
from aptsjax.optim.config import configure_trust_region
from tests.problems import X0
from tests.problems import apts_updates
from tests.problems import flat
from tests.problems import mlp_loss
from tests.problems import problem
from tests.problems import quadratic

# The paper's options of APTS beyond the trust-region constants, spelled out.
PAPER_OPTIONS = dict(combine="sum", local_solver="trust_region", local_lr=1e-3,
                     local_radius="bound", local_steps=5, global_steps=1, block_bound="equal",
                     consistency=True, radius_units="absolute", outer_momentum=0.0)

# ----------------------------------------------------------------------------
# The presets


def test_paper_presets_are_the_paper_tables():
  """TrustRegionConfig.paper() and APTSConfig.paper() hold the paper's values; the library's
  defaults differ from them only where the issue and the study chose to."""
  tr = TrustRegionConfig.paper()
  assert (tr.init_radius, tr.min_radius, tr.max_radius) == (0.01, 1e-3, 4.0)
  assert (tr.eta_accept, tr.eta1, tr.eta2, tr.alpha, tr.beta) == (0.0, 0.25, 0.75, 0.5, 2.0)
  assert (tr.radius_growth, tr.norm, tr.rms_decay, tr.rms_eps) == ("always", "l2", 0.999, 1e-8)
  assert tr.validate() is tr
  # trust_region's default: a radius floor of 1e-10 and growth after boundary steps only.
  assert TrustRegionConfig() == tr._replace(min_radius=aptsjax.GENERAL_MIN_RADIUS,
                                            radius_growth="boundary")
  assert aptsjax.GENERAL_MIN_RADIUS == 1e-10

  paper = APTSConfig.paper()
  assert paper == APTSConfig(trust_region=TrustRegionConfig.paper(), **PAPER_OPTIONS)
  assert paper.validate() is paper
  # apts's default: the paper's region with a per-parameter floor of 1e-6, radii per parameter,
  # the mean of the local steps, Adam's direction at the local radius kept across updates, and
  # the global steps chosen by the batch (1 on a plain batch, 0 on a stream).
  assert APTSConfig() == paper._replace(
      trust_region=TrustRegionConfig.paper()._replace(min_radius=1e-6), combine="mean",
      local_solver="adam_tr", local_radius="carry", global_steps=None, consistency=None,
      radius_units="per_parameter")
  plain, stream = APTSConfig().resolve(False), APTSConfig().resolve(True)
  assert (plain.global_steps, plain.consistency, stream.global_steps, stream.consistency) == (
      1, True, 0, False)
  assert (APTSConfig().steps_after(False), APTSConfig().steps_after(True)) == (1, 0)
  assert (paper.steps_after(False), paper.steps_after(True)) == (1, 1)


def test_configure_accepts_the_options_and_keeps_the_rest():
  cfg = configure_trust_region(radius_growth="always", norm="rms", rms_decay=0.9, rms_eps=1e-6,
                               eta2=0.8, init_radius=1)
  assert cfg == TrustRegionConfig(radius_growth="always", norm="rms", rms_decay=0.9,
                                  rms_eps=1e-6, eta2=0.8, init_radius=1.0)
  assert isinstance(cfg.init_radius, float)               # a constant is a float
  assert configure_trust_region() == TrustRegionConfig()
  assert configure_apts() == APTSConfig()
  base = TrustRegionConfig(init_radius=0.5, norm="rms")
  assert configure_trust_region(base, eta1=0.1) == base._replace(eta1=0.1)
  # apts: its own fields and its region's, routed to the right place.
  cfg = configure_apts(APTSConfig.paper(), local_radius="split", local_steps=np.int64(3),
                       norm="rms", min_radius=1e-4)
  assert cfg == APTSConfig.paper()._replace(
      local_radius="split", local_steps=3,
      trust_region=TrustRegionConfig.paper()._replace(norm="rms", min_radius=1e-4))
  assert type(cfg.local_steps) is int                     # a count is an int


@pytest.mark.parametrize("configure, name, allowed", [
    (configure_trust_region, "radius_growth", ("always", "boundary")),
    (configure_trust_region, "norm", ("l2", "rms")),
    (configure_apts, "norm", ("l2", "rms")),
    (configure_apts, "local_radius", ("bound", "split")),
    (configure_apts, "combine", ("sum", "mean")),
    (configure_apts, "block_bound", ("equal", "size")),
])
def test_a_literal_option_off_its_choices_raises(configure, name, allowed):
  for value in ("sometimes", allowed[0].upper(), 1, 1.0, None, True):
    with pytest.raises(ValueError) as info:
      configure(**{name: value})
    assert name in str(info.value)
    assert all(repr(a) in str(info.value) for a in allowed), str(info.value)


@pytest.mark.parametrize("bad", [{"combine": "max"}, {"local_solver": "sgd"}, {"local_lr": 0.0},
                                 {"combine": 1.0}, {"local_steps": 0}, {"global_steps": -1},
                                 {"block_bound": "area"}])
def test_bad_apts_options_raise(bad):
  with pytest.raises(ValueError, match=next(iter(bad))):
    aptsjax.apts(mlp_loss, num_subdomains=2, **bad)


def test_bad_constants_raise():
  with pytest.raises(ValueError, match="eta1 must be a number"):
    configure_trust_region(eta1="0.25")
  with pytest.raises(ValueError, match="init_radius must be a number"):
    configure_trust_region(init_radius=True)
  with pytest.raises(ValueError, match="unknown trust_region option 'learning_rate'"):
    configure_trust_region(learning_rate=0.1)
  with pytest.raises(ValueError, match="unknown apts option 'learning_rate'"):
    configure_apts(learning_rate=0.1)
  for kwargs in ({"rms_decay": 1.0}, {"rms_decay": -0.1}, {"rms_decay": 2.0},
                 {"rms_eps": 0.0}, {"rms_eps": -1e-8}, {"rms_decay": float("nan")}):
    with pytest.raises(ValueError, match="rms_decay"):
      configure_trust_region(**kwargs)
    with pytest.raises(ValueError, match="rms_decay"):
      aptsjax.trust_region(quadratic, norm="rms", **kwargs)
    with pytest.raises(ValueError, match="rms_decay"):
      aptsjax.apts(mlp_loss, norm="rms", **kwargs)


# ----------------------------------------------------------------------------
# Foreign options, removed names and the base's type


@pytest.mark.parametrize("name", [f for f in APTSConfig._fields if f != "trust_region"])
def test_an_apts_option_given_to_trust_region_raises_naming_apts(name):
  """trust_region(f, combine="sum") was accepted and ignored; now it names aptsjax.apts."""
  value = getattr(APTSConfig.paper(), name)
  with pytest.raises(ValueError, match=rf"'{name}' is an option of aptsjax\.apts \(APTSConfig\), "
                                       r"not of trust_region"):
    aptsjax.trust_region(quadratic, **{name: value})


def test_removed_names_raise():
  """``local_method=`` is gone (``local_solver=`` is the one way to choose the solver)."""
  with pytest.raises(ValueError, match="unknown apts option 'local_method'"):
    aptsjax.apts(mlp_loss, local_method="adam")
  assert not hasattr(aptsjax, "Hyperparams")


def test_the_base_must_be_the_methods_config():
  with pytest.raises(ValueError, match="base must be an aptsjax.TrustRegionConfig, got dict"):
    configure_trust_region({"init_radius": 0.1})
  with pytest.raises(ValueError, match="an APTSConfig configures aptsjax.apts"):
    aptsjax.trust_region(quadratic, base=APTSConfig())
  with pytest.raises(ValueError, match=r"APTSConfig\(trust_region=\.\.\.\)"):
    aptsjax.apts(mlp_loss, base=TrustRegionConfig.paper())


def test_an_apts_base_holding_no_region_config_raises_value_error():
  """APTSConfig.validate names the problem; configure_apts must reach it (a ValueError, not an
  AttributeError from the dict)."""
  with pytest.raises(ValueError, match="trust_region must be an aptsjax.TrustRegionConfig"):
    aptsjax.apts(mlp_loss, base=APTSConfig(trust_region={"init_radius": 0.1}))


# ----------------------------------------------------------------------------
# base= wins; options override it


def rejecting(x, batch=None):
  """A loss whose every trial point is NaN (finite value and gradient at 0 only)."""
  del batch
  return jnp.sum(x) + jnp.where(jnp.any(x != 0), jnp.nan, 0.0)


@pytest.mark.parametrize("base, floor", [(None, 0.75e-3), (TrustRegionConfig.paper(), 1e-3)])
def test_the_base_is_used_as_it_is(base, floor):
  """No min_radius is forced any more: with base=TrustRegionConfig.paper() a rejection shrinks
  the radius 1.5e-3 to the paper's floor 1e-3; with the default base to alpha * 1.5e-3."""
  tx = aptsjax.trust_region(rejecting, second_order=False, base=base, init_radius=1.5e-3)
  x = jnp.zeros(3)
  _, state = tx.update(jax.grad(rejecting)(x), tx.init(x), x)
  assert not bool(state.accepted)
  assert float(state.radius) == pytest.approx(floor, rel=1e-6)


def test_base_sets_radius_ceiling_and_norm_of_both_methods():
  """A base sets the initial radius, the ceiling and the norm; an override beats it."""
  region = TrustRegionConfig(init_radius=0.05, max_radius=0.05, norm="rms")
  x = jnp.asarray(X0, jnp.float32)
  tx = aptsjax.trust_region(quadratic, second_order=False, base=region)
  state = tx.init(x)
  assert float(state.radius) == pytest.approx(0.05) and state.scaling is not None
  _, state = jax.jit(tx.update)(jax.grad(quadratic)(x), state, x)
  # A short first-order step on a quadratic: rho ~ 1 > eta2, but the ceiling is the base's.
  assert bool(state.accepted)
  assert float(state.actual_reduction) > 0.75 * float(state.predicted_reduction)
  assert float(state.radius) == pytest.approx(0.05)
  params, batch = problem()
  base = APTSConfig(trust_region=region, radius_units="absolute")
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=1, second_order=False, base=base)
  state = tx.init(params)
  assert float(state.radius) == pytest.approx(0.05) and state.scaling is not None
  _, state = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))(params, state)
  assert float(state.radius) <= 0.05 * (1 + 1e-7)
  # An override beats the base.
  assert aptsjax.apts(mlp_loss, base=base, norm="l2").init(params).scaling is None
  assert aptsjax.trust_region(quadratic, base=region, norm="l2").init(x).scaling is None


def test_apts_paper_preset_is_bitwise_the_options_spelled_out():
  """base=APTSConfig.paper() is the same method as every paper option spelled out, and the
  spelled-out options beat a base that says otherwise."""
  params, batch = problem()
  paper = dict(radius_growth="always", min_radius=1e-3, norm="l2", local_radius="bound",
               combine="sum", local_solver="trust_region", global_steps=1,
               radius_units="absolute")
  other = APTSConfig(trust_region=TrustRegionConfig(radius_growth="boundary", norm="rms"),
                     local_radius="split")
  kw = dict(num_subdomains=2, local_steps=3, init_radius=0.1, second_order=False)
  runs = [apts_updates(aptsjax.apts(mlp_loss, base=APTSConfig.paper(), **kw), params, batch, 3),
          apts_updates(aptsjax.apts(mlp_loss, **paper, **kw), params, batch, 3),
          apts_updates(aptsjax.apts(mlp_loss, base=other, **paper, **kw), params, batch, 3)]
  # The options would change this run: "split" and "rms" give other steps.
  changed = apts_updates(aptsjax.apts(mlp_loss, base=other, **kw), params, batch, 1)
  assert not np.array_equal(flat(changed[0][1]), flat(runs[0][0][1]))
  assert runs[0][-1][2].scaling is None
  for run in runs[1:]:
    for (_, u_ref, s_ref), (_, u, s) in zip(runs[0], run, strict=True):
      jax.tree.map(np.testing.assert_array_equal, (u, s), (u_ref, s_ref))
