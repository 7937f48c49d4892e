"""The optax contract of both transformations, in the spirit of optax's ``contrib/_common_test.py``.

Parametrised over {trust_region, apts} x {first order, second order}, with the library's default
options (apts: per-subdomain Adam states; the paper's per-subdomain L-SR1 memories are the same
``LSR1State`` as trust_region's second-order memory).

* jit of ``init`` and ``update``; an ``optax.GradientTransformationExtraArgs`` whose ``update``
  takes ``batch=`` and ``value=`` and ignores extra arguments it does not know, also inside
  ``optax.chain`` with a transformation that leaves the updates alone;
* dtypes: float32 and float64 parameters give updates and floating state leaves of their dtype
  (the other leaves int32 or bool); float32 parameters with float64 data stay float32;
  bfloat16 / float16 parameters train in first order and are refused in second order;
* the state keeps its tree structure, shapes and dtypes across updates, so ``jax.lax.scan`` runs
  the updates;
* ``optax.tree.get(state, "value")`` and ``optax.value_and_grad_from_state`` (and aptsjax's
  variant) find the state's value and gradient, bare or inside ``optax.chain``;
* ``optax.inject_hyperparams`` refuses the factories with a ValueError (see the test).

Each configuration's transformations and jitted functions are built once (``contract``) and
reused by the tests.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from tests.problems import lsq_loss
from tests.problems import lsq_problem
from tests.problems import mlp_loss
from tests.problems import problem
from tests.problems import train

CASES = [("trust_region", False), ("trust_region", True), ("apts", False), ("apts", True)]
IDS = ["trust_region-o1", "trust_region-o2", "apts-o1", "apts-o2"]
ROWS = 32


def make(method: str, second_order: bool, loss_fn=mlp_loss, **options: Any
         ) -> optax.GradientTransformationExtraArgs:
  """The transformation under test (small memories and few local steps: cheap to compile)."""
  if method == "trust_region":
    return aptsjax.trust_region(loss_fn, memory=3, second_order=second_order, **options)
  return aptsjax.apts(loss_fn, num_subdomains=2, second_order=second_order, memory=3,
                      local_steps=2, **options)


class Contract(NamedTuple):
  """One configuration: the transformation, its chain and their jitted functions."""
  tx: optax.GradientTransformationExtraArgs
  chain: optax.GradientTransformationExtraArgs
  init: Any
  step: Any         # (params, state, batch) -> (params, state, updates), grads at params
  chain_step: Any   # the same through the chain, with value= and an unknown extra argument


def one_step(tx, extra: bool):
  """A full-batch update: gradient at params, ``tx.update``, ``optax.apply_updates``."""
  def step(params, state, batch):
    value, grads = jax.value_and_grad(mlp_loss)(params, batch)
    kwargs = dict(value=value, unknown_extra_argument=jnp.ones(())) if extra else {}
    updates, state = tx.update(grads, state, params, batch=batch, **kwargs)
    return optax.apply_updates(params, updates), state, updates
  return step


@functools.lru_cache(maxsize=None)
def contract(method: str, second_order: bool) -> Contract:
  tx = make(method, second_order)
  chain = optax.chain(optax.identity(), tx)
  return Contract(tx=tx, chain=chain, init=jax.jit(tx.init), step=jax.jit(one_step(tx, False)),
                  chain_step=jax.jit(one_step(chain, True)))


def signature(tree) -> tuple:
  """Tree structure, shapes and dtypes of a pytree."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


def assert_dtypes(state, updates, dtype) -> None:
  """Updates of the parameters' dtype; floating state leaves too, the others int32 or bool."""
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == dtype, (jax.tree_util.keystr(path), leaf.dtype)
    else:
      assert leaf.dtype in (jnp.int32, jnp.bool_), (jax.tree_util.keystr(path), leaf.dtype)


def run(c: Contract, params, batch, steps: int, chained: bool = False):
  """``steps`` jitted updates from a fresh state; returns (params, state, updates, states)."""
  state = (c.chain if chained else c.tx).init(params)
  step = c.chain_step if chained else c.step
  states = [state]
  for _ in range(steps):
    params, state, updates = step(params, state, batch)
    states.append(state)
  return params, state, updates, states


@pytest.mark.parametrize("method, second_order", CASES, ids=IDS)
def test_jit_extra_args_and_chain(method, second_order):
  """jit(init) = init; jitted updates take batch=, value= and unknown extra arguments, and
  optax.chain(optax.identity(), tx) gives the bare transformation's updates."""
  c = contract(method, second_order)
  assert isinstance(c.tx, optax.GradientTransformationExtraArgs)
  params, batch = problem(rows=ROWS)
  for got, want in zip(jax.tree.leaves(c.init(params)), jax.tree.leaves(c.tx.init(params)),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  bare = run(c, params, batch, 2)
  chained = run(c, params, batch, 2, chained=True)
  assert isinstance(chained[1][0], optax.EmptyState)
  for a, b in zip(jax.tree.leaves((bare[0], bare[1])),
                  jax.tree.leaves((chained[0], chained[1][1])), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(bare[1].iteration) == 2 and float(bare[1].value) < float(mlp_loss(params, batch))


@pytest.mark.parametrize("method, second_order", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtypes_and_state_are_stable_across_updates(method, second_order, dtype, request):
  """float32 and float64 parameters keep their dtype in the updates and the state, and the
  state's structure, shapes and dtypes do not change over two updates."""
  if dtype == "float64":
    request.getfixturevalue("x64")
  c = contract(method, second_order)
  params, batch = problem(jnp.dtype(dtype), rows=ROWS)
  _, state, updates, states = run(c, params, batch, 2)
  assert_dtypes(state, updates, jnp.dtype(dtype))
  assert signature(states[0]) == signature(states[1]) == signature(states[2])
  assert jax.eval_shape(c.tx.init, params) == jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[0])


@pytest.mark.parametrize("method, second_order", CASES, ids=IDS)
def test_lax_scan_over_updates(method, second_order):
  """The state is a loop carry: jax.lax.scan over two updates equals the Python loop."""
  c = contract(method, second_order)
  params, batch = problem(rows=ROWS)
  want_params, want_state, _, _ = run(c, params, batch, 2)

  @jax.jit
  def scanned(params, state):
    def body(carry, _):
      p, s, _ = one_step(c.tx, False)(*carry, batch)
      return (p, s), s.value
    return jax.lax.scan(body, (params, state), length=2)

  (got_params, got_state), values = scanned(params, c.tx.init(params))
  assert values.shape == (2,)
  for a, b in zip(jax.tree.leaves((got_params, got_state)),
                  jax.tree.leaves((want_params, want_state)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, second_order", CASES, ids=IDS)
def test_value_and_grad_from_state_bare_and_in_chain(method, second_order):
  """optax.tree.get finds the state's value and grad, and optax.value_and_grad_from_state (and
  aptsjax's variant) returns them once they are finite: the loss and gradient at the updated
  parameters on the (full) batch; before the first update (value inf) it computes them."""
  c = contract(method, second_order)
  params, batch = problem(rows=ROWS)
  new_params, chain_state, _, states = run(c, params, batch, 1, chained=True)
  for fn in (optax.value_and_grad_from_state(mlp_loss),
             aptsjax.value_and_grad_from_state(mlp_loss)):
    for state, at in ((states[0], params), (chain_state, new_params),
                      (states[0][1], params), (chain_state[1], new_params)):
      assert optax.tree.get(state, "value") is not None
      value, grad = jax.jit(lambda p, s, fn=fn: fn(p, batch, state=s))(at, state)
      want_value, want_grad = jax.value_and_grad(mlp_loss)(at, batch)
      np.testing.assert_allclose(value, want_value, rtol=1e-5)
      for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(optax.tree.get(chain_state, "value")) == float(chain_state[1].value)
  assert not np.isfinite(float(optax.tree.get(states[0], "value")))   # init stores inf


@pytest.mark.parametrize("method, second_order", CASES, ids=IDS)
def test_float32_params_with_float64_data(x64, method, second_order):
  """float32 parameters with float64 data under jax_enable_x64: everything stays float32."""
  params, batch = lsq_problem(dtype=np.float32)
  batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), batch)
  run = train(make(method, second_order, loss_fn=lsq_loss), lsq_loss, params, batch, 3)
  assert_dtypes(run.state, run.updates, jnp.float32)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(run.params))
  assert run.values[-1] < run.losses[0]


@pytest.mark.parametrize("method, second_order", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_first_order_trains_and_second_order_is_refused(method, second_order,
                                                                       dtype):
  """bfloat16 / float16: the first-order methods train (norms accumulate in float32: the
  squared gradient norm near 4e5 would overflow float16), the second-order ones are refused at
  init, as are non-floating parameters."""
  params, batch = lsq_problem(dtype=dtype, scale=20.0)
  tx = make(method, second_order, loss_fn=lsq_loss)
  int_params = {"w": jnp.zeros(5, jnp.int32), "b": jnp.zeros((), jnp.int32)}
  with pytest.raises(ValueError, match="floating arrays, got leaves of dtype int32"):
    tx.init(int_params)
  if second_order:
    with pytest.raises(ValueError, match=r"float32 or float64.*second_order=False.*float32"):
      tx.init(params)
    return
  run = train(tx, lsq_loss, params, batch, 8)
  assert_dtypes(run.state, run.updates, dtype)
  losses = run.losses
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("method", ["trust_region", "apts"])
def test_inject_hyperparams_is_refused(method):
  """optax.inject_hyperparams cannot wrap the factories, and says so.

  inject_hyperparams binds the factory's signature and calls it again with every bound argument
  as a keyword: the options arrive through ``**options``, which binds as one argument named
  ``options`` (a dict, ``{}`` when none is given). Behind that, ``loss_fn`` (a callable) would be
  taken for a schedule unless listed in ``static_args``, and the constants would arrive as
  arrays, which the configs' validation (Python comparisons at construction) refuses. The
  factories recognise the bound ``options`` dict and raise a ValueError naming
  inject_hyperparams and what to do instead.
  """
  factory = getattr(aptsjax, method)
  params, _ = problem(rows=ROWS)
  for kwargs in ({"init_radius": 0.1}, {}):
    tx = optax.inject_hyperparams(factory, static_args=("loss_fn",))(mlp_loss, **kwargs)
    with pytest.raises(ValueError, match=rf"{method}: .*optax.inject_hyperparams.* not "
                                         r"supported\. Build a new transformation"):
      tx.init(params)
