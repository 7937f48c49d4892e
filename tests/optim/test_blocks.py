"""Tests of parameter-block subdomains: aptsjax.optim.blocks and aptsjax.apts(param_blocks=...).

Across devices: tests/parallel/test_devices.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import aptsjax
from aptsjax import APTSConfig
from aptsjax import TrustRegionConfig
from aptsjax.optim import blocks
from aptsjax.optim.local import LocalSolver

N_ROWS = 32


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def problem(dtype=jnp.float32, rows=N_ROWS):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w1": 0.5 * jax.random.normal(k1, (3, 4), dtype), "b1": jnp.zeros(4, dtype),
            "w2": 0.5 * jax.random.normal(k2, (4,), dtype), "b2": jnp.zeros((), dtype)}
  x = jax.random.normal(k3, (rows, 3), dtype)
  return params, (x, jnp.sin(x[:, 0]) + x[:, 1] * x[:, 2])


# Per-column blocks of w1 (labels of shape (1, 4)), b1 with w1's columns, w2 and b2 one more block.
COLUMNS = {"w1": np.array([[0, 1, 2, 0]]), "b1": np.array([0, 1, 2, 0]), "w2": 3, "b2": 3}


def in_block(params, labels, j):
  """The 0/1 mask of block j, like params."""
  return jax.tree.map(lambda p, lab: np.broadcast_to(np.asarray(lab) == j, np.shape(p)),
                      params, labels)


# ---------------------------------------------------------------------------- labels

def test_leaf_and_layer_blocks():
  params = {"params": {"dense_0": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)},
                       "dense_1": {"kernel": np.zeros((3, 1)), "bias": np.zeros(1)}}}
  leaves = blocks.leaf_blocks(params)
  assert [int(x) for x in jax.tree.leaves(leaves)] == [0, 1, 2, 3]
  layers = blocks.layer_blocks(params)
  assert layers["params"]["dense_0"] == {"kernel": 0, "bias": 0}
  assert layers["params"]["dense_1"] == {"kernel": 1, "bias": 1}
  assert blocks.resolve("layers", params).count == 2
  assert blocks.resolve("leaves", params).count == 4
  # A chain of single-child levels down to one layer: its leaves are the blocks.
  assert [int(x) for x in jax.tree.leaves(blocks.layer_blocks({"a": {"b": {"w": 1.0, "v": 2.0}}}))
          ] == [0, 1]


@pytest.mark.parametrize("replicated, rest", [("own", 2), ("first", 0)])
def test_shard_blocks(replicated, rest):
  params = {"k": np.zeros((4, 6)), "b": np.zeros(6), "s": np.zeros(3)}
  specs = {"k": P(None, "model"), "b": P("model"), "s": None}
  labels = blocks.shard_blocks(params, specs, "model", 2, replicated=replicated)
  np.testing.assert_array_equal(labels["k"], [[0, 0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(labels["b"], [0, 0, 0, 1, 1, 1])
  assert int(labels["s"]) == rest
  assert blocks.resolve(labels, params).count == (3 if replicated == "own" else 2)
  with pytest.raises(ValueError, match="cannot be split into 4 blocks"):
    blocks.shard_blocks(params, specs, "model", 4)
  with pytest.raises(ValueError, match="alone"):
    blocks.shard_blocks(params, {**specs, "b": P(("data", "model"))}, "model", 2)
  with pytest.raises(ValueError, match="one PartitionSpec"):
    blocks.shard_blocks(params, {"k": P()}, "model", 2)


@pytest.mark.parametrize("labels, message", [
    ({"w1": 0, "b1": 0, "w2": 0}, "structure"),
    ({**COLUMNS, "w1": np.array([[0, 1, 2]])}, "do not broadcast"),
    ({**COLUMNS, "w1": np.zeros((3, 4, 1), int)}, "do not broadcast"),
    ({**COLUMNS, "b2": -1}, ">= 0"),
    ({**COLUMNS, "b2": 5}, r"no entry has label\(s\) \[4\]"),
    ({**COLUMNS, "b2": 1.0}, "integers"),
    ({**COLUMNS, "b2": True}, "integers"),
    ("layer", "one of"),
])
def test_bad_labels_raise(labels, message):
  params, _ = problem()
  with pytest.raises(ValueError, match=message):
    aptsjax.apts(mlp_loss, param_blocks=labels).init(params)


def test_traced_labels_raise():
  params, _ = problem()
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda lab: blocks.resolve({**COLUMNS, "b2": lab}, params).count)(3)


# ---------------------------------------------------------------------------- apts

def run(tx, params, batch, iters):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  for _ in range(iters):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("base", [None, APTSConfig.paper()])
def test_one_block_equals_no_blocks(base):
  params, batch = problem()
  kw = dict(num_subdomains=2, local_steps=3, base=base)
  ref = run(aptsjax.apts(mlp_loss, **kw), params, batch, 3)
  one = run(aptsjax.apts(mlp_loss, param_blocks=jax.tree.map(lambda _: 0, params), **kw),
            params, batch, 3)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(one)):
    np.testing.assert_array_equal(a, b)


def recording(inner: LocalSolver) -> LocalSolver:
  """``inner`` whose persistent state also holds the last local step theta_i - theta^k."""
  def init(params):
    return inner.init(params), optax.tree.zeros_like(params)

  def start(params, loss, grad, state, bound):
    carry = inner.start(params, loss, grad, state[0], bound)
    return carry._replace(state=(carry.state, optax.tree.zeros_like(params)))

  def step(value_and_grad, carry, anchor, bound, active):
    carry, done = inner.step(value_and_grad, carry._replace(state=carry.state[0]), anchor,
                             bound, active)
    return carry._replace(state=(carry.state, optax.tree.sub(carry.params, anchor))), done

  return LocalSolver(init, start, step)


SOLVERS = {  # name -> (LocalSolver for N subdomains and J blocks with combine="sum", base)
    "tr-o1": lambda n, j: aptsjax.trust_region_local_solver(
        TrustRegionConfig.paper().scaled(n * math.sqrt(j)), False, 10, 3),
    "tr-o2": lambda n, j: aptsjax.trust_region_local_solver(
        TrustRegionConfig.paper().scaled(n * math.sqrt(j)), True, 10, 3),
    "adam": lambda n, j: aptsjax.optax_local_solver(optax.adam(0.05)),
}


@pytest.mark.parametrize("solver, norm", [
    ("tr-o1", "l2"), pytest.param("tr-o2", "l2", marks=pytest.mark.slow), ("adam", "l2"),
    ("tr-o1", "rms")])
def test_block_steps_stay_in_their_blocks(solver, norm):
  """Every local step of problem (i, j) is zero outside block j; s~ is their sum, within Delta."""
  params, batch = problem()
  n, j = 2, 4
  tx = aptsjax.apts(mlp_loss, num_subdomains=n, local_steps=3, second_order=solver == "tr-o2",
                    base=APTSConfig.paper(), norm=norm, global_steps=0,
                    param_blocks=COLUMNS, local_solver=recording(SOLVERS[solver](n, j)),
                    init_radius=0.5)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  for _ in range(3):
    radius = float(state.radius)
    updates, state = step(params, state)
    inner, steps = state.local_state
    assert state.local_steps.shape == (n * j,)
    for k in range(n * j):
      s_k = jax.tree.map(lambda x, k=k: np.asarray(x[k]), steps)
      inside = in_block(params, COLUMNS, k % j)
      for x, m in zip(jax.tree.leaves(s_k), jax.tree.leaves(inside)):
        assert np.all(x[~m] == 0.0), (k, x)
      assert any(np.any(x[m] != 0.0) for x, m in zip(jax.tree.leaves(s_k), jax.tree.leaves(inside)))
      if solver == "tr-o2":  # the L-SR1 pairs of the problem live in its block too
        for x, m in zip(jax.tree.leaves(inner.s), jax.tree.leaves(inside)):
          assert np.all(np.asarray(x[k])[:, ~m] == 0.0)
    if norm == "l2":  # every data subdomain's concatenated block steps within Delta / N
      per_i = [math.sqrt(sum(float(jnp.sum(x[i * j:(i + 1) * j] ** 2))
                             for x in jax.tree.leaves(steps))) for i in range(n)]
      assert max(per_i) <= radius / n * (1 + 1e-5)
      if solver == "tr-o1":  # each block step reaches its bound Delta / (N sqrt(J))
        assert min(per_i) >= radius / n * (1 - 1e-3)
    total = jax.tree.map(lambda x: jnp.sum(x, axis=0), steps)   # in u = D theta for rms
    assert float(optax.tree.norm(total)) <= radius * (1 + 1e-5)  # |s~| (|D s~|) <= Delta
    if norm == "rms":
      total = jax.tree.map(lambda x, d: x / d, total, state.scaling.d)
    if bool(state.apts_accepted):
      for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(total)):
        np.testing.assert_allclose(u, s, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, updates)


def test_default_adam_moments_stay_in_blocks_and_step_within_radius():
  """The library's defaults (Adam local solver, combine="mean"): Adam's moments of problem
  (i, j) are zero outside block j."""
  params, batch = problem()
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=4, param_blocks=COLUMNS,
                    global_steps=0, init_radius=0.3)
  params, state = run(tx, params, batch, 1)
  radius = float(state.radius)
  updates, state = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))(params, state)
  adam = state.local_state[0]
  for k in range(8):
    inside = in_block(params, COLUMNS, k % 4)
    for moments in (adam.mu, adam.nu):
      pairs = [(np.asarray(x[k]), m) for x, m in zip(jax.tree.leaves(moments),
                                                     jax.tree.leaves(inside))]
      assert all(np.all(x[~m] == 0.0) for x, m in pairs)
      assert any(np.any(x[m] != 0.0) for x, m in pairs)
  assert float(optax.tree.norm(updates)) <= radius * (1 + 1e-5)


# ------------------------------------------------------------------- a numpy oracle

def linear_loss(params, batch):
  x, y = batch
  return 0.5 * jnp.mean((x @ params["a"] + params["b"] - y) ** 2)


@pytest.mark.parametrize("block_bound", ["equal", "size"])
def test_one_update_matches_numpy_oracle(x64, block_bound):
  """First-order local TR, one local step: s~, the prediction and the ratio by hand."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(8, 3)), rng.normal(size=8)
  a0, b0 = rng.normal(size=3), rng.normal(size=2)
  labels = {"a": np.array([0, 1, 2]), "b": np.array([2, 0])}  # J = 3, b's entries apart
  mask = [np.concatenate([labels["a"] == j, labels["b"] == j]) for j in range(3)]
  xb = np.concatenate([x, np.ones((8, 1)), np.zeros((8, 1))], axis=1)  # theta = (a, b)
  xb[:, 4] = 2.0 * x[:, 0]                                             # b[1] scales x0
  theta = np.concatenate([a0, b0])

  def loss(params, batch):
    xs, ys = batch
    pred = xs @ params["a"] + params["b"][0] + 2.0 * xs[:, 0] * params["b"][1]
    return 0.5 * jnp.mean((pred - ys) ** 2)

  f = lambda t, rows: 0.5 * np.mean((xb[rows] @ t - y[rows]) ** 2)
  grad = lambda t, rows: xb[rows].T @ (xb[rows] @ t - y[rows]) / len(rows)
  for combine, n in (("sum", 2), ("mean", 2), ("sum", 1)):
    radius, nb = 0.05, 3
    parts = np.split(np.arange(8), n)
    g = grad(theta, np.arange(8))
    bound = radius / (n if combine == "sum" else 1)
    # "equal": B / sqrt(J) per block; "size": B sqrt(n_j / n), n_j = 2, 1, 2 of n = 5.
    factors = ([1 / math.sqrt(nb)] * nb if block_bound == "equal"
               else [math.sqrt(m.sum() / 5) for m in mask])
    weight = 1.0 if combine == "sum" else 1.0 / n
    s_tilde, pred = np.zeros(5), 0.0
    for rows in parts:
      r = g - grad(theta, rows)
      f_i = lambda t, rows=rows, r=r: f(t, rows) + r @ (t - theta)
      for m, factor in zip(mask, factors):
        s = -bound * factor * m * g / np.linalg.norm(m * g)
        if f_i(theta) - f_i(theta + s) > 0:  # the local ratio test (eta_accept = 0)
          s_tilde += weight * s
          pred += weight * (f_i(theta) - f_i(theta + s))
    actual = f(theta, np.arange(8)) - f(theta + s_tilde, np.arange(8))

    params = {"a": jnp.asarray(a0), "b": jnp.asarray(b0)}
    tx = aptsjax.apts(loss, num_subdomains=n, local_steps=1, base=APTSConfig.paper(),
                      combine=combine, global_steps=0, init_radius=radius, param_blocks=labels,
                      block_bound=block_bound)
    updates, state = jax.jit(lambda p, s, b, tx=tx: tx.update(None, s, p, batch=b))(
        params, tx.init(params), (jnp.asarray(x), jnp.asarray(y)))
    got = np.concatenate([np.asarray(updates["a"]), np.asarray(updates["b"])])
    assert bool(state.apts_accepted) == (actual > 0)
    np.testing.assert_allclose(got, s_tilde if actual > 0 else 0.0, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(float(state.predicted_reduction), pred, rtol=1e-10)
    np.testing.assert_allclose(float(state.actual_reduction), actual, rtol=1e-8, atol=1e-15)
    rho = actual / pred
    want = min(2 * radius, 4.0) if rho > 0.75 else (max(0.5 * radius, 1e-3) if rho < 0.25
                                                    else radius)
    np.testing.assert_allclose(float(state.radius), want, rtol=1e-12)
    assert np.linalg.norm(s_tilde) <= radius * (1 + 1e-12)
    assert pred > 0 and np.count_nonzero(s_tilde) == 5


def test_block_bounds_split_the_bound():
  """Both rules give bounds whose squares sum to the data bound's square; "size" by entries."""
  params, _ = problem()
  spec = blocks.resolve("layers", params)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert sum(spec.sizes) == n
  for rule in blocks.BOUNDS:
    d = blocks.divisors(3, spec, rule)
    np.testing.assert_allclose(np.sum((1.0 / d) ** 2), 1.0 / 9.0, rtol=1e-12)
  size = blocks.divisors(3, spec, "size")
  np.testing.assert_allclose(3.0 / size, np.sqrt(np.asarray(spec.sizes) / n), rtol=1e-12)
  with pytest.raises(ValueError, match="block_bound"):
    aptsjax.apts(mlp_loss, param_blocks="layers", block_bound="area")
