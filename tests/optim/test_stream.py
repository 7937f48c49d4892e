"""APTS on a ``Stream``: local step h of subdomain i on its rows of minibatch h.

The numpy oracle below is written from docs/method.md, "Streams": the consistency term fixed at
the exchange from minibatch 0, each local step's value, gradient, trial and ratio test on its own
minibatch, and the global test (6) on minibatch 0, its denominator the decreases of the first
local objectives f_{i,0} from theta^k to theta_i.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax.optim import local
from aptsjax.optim import local_stream

CFG = aptsjax.TrustRegionConfig.paper()
N, H, ROWS, DIM = 2, 3, 8, 4          # subdomains, minibatches, rows per minibatch, parameters


def data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(H, ROWS, DIM))
  y = rng.normal(size=(H, ROWS))
  return x, y


def loss_fn(theta, batch):
  x, y = batch
  return 0.5 * jnp.mean((x @ theta - y) ** 2)


def np_loss(theta, x, y):
  r = x @ theta - y
  return 0.5 * float(np.mean(r * r)), x.T @ r / len(y)


def oracle_local(theta_k, f, grad0, loss0, bound, steps, moments):
  """adam_tr with local_radius="split" over the local objectives f(h, x) -> (value, grad);
  Adam's ``moments`` (m, v, count) persist across updates."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  x, loss, grad = theta_k.copy(), loss0, grad0
  m, v, count = moments
  radius = min(bound, max(bound / steps, CFG.min_radius))
  taken = 0
  for h in range(steps):
    if h > 0:
      loss, grad = f(h, x)
    m, v, count = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad ** 2, count + 1
    d = (m / (1 - b1 ** count)) / (np.sqrt(v / (1 - b2 ** count)) + eps)
    length = min(radius, bound - np.linalg.norm(x - theta_k))
    s = -length * d / np.linalg.norm(d)
    pred = -grad @ s
    new_loss, new_grad = f(h, x + s)
    actual = loss - new_loss
    if pred > 0 and actual > CFG.eta2 * pred:
      radius = min(CFG.beta * radius, CFG.max_radius)
    elif not (pred > 0 and actual >= CFG.eta1 * pred):
      radius = max(CFG.alpha * radius, CFG.min_radius)
    if pred > 0 and actual > 0:
      x, loss, grad = x + s, new_loss, new_grad
    taken += 1
    if np.linalg.norm(x - theta_k) >= (1 - local.LOCAL_STOP) * bound:
      break
  return x, taken, (m, v, count)


def oracle_update(theta_k, xs, ys, radius, consistency, moments):
  """One APTS update (combine="mean", global_steps=0, first order) on the stream."""
  b = ROWS // N
  rows = lambda h, i: (xs[h, i * b:(i + 1) * b], ys[h, i * b:(i + 1) * b])
  g0 = [np_loss(theta_k, *rows(0, i))[1] for i in range(N)]
  g_k = np.mean(g0, axis=0)
  steps, decreases, taken = [], [], []
  for i in range(N):
    r = g_k - g0[i] if consistency else np.zeros(DIM)

    def f(h, x, i=i, r=r):
      value, grad = np_loss(x, *rows(h, i))
      return value + r @ (x - theta_k), grad + r

    loss0, grad0 = f(0, theta_k)
    x, t, moments[i] = oracle_local(theta_k, f, grad0, loss0, radius, H, moments[i])
    dec = loss0 - f(0, x)[0]
    steps.append(x - theta_k)
    decreases.append(dec)
    taken.append(t)
  s = np.mean(steps, axis=0)
  if np.linalg.norm(s) > radius:
    s = s * radius / np.linalg.norm(s)
  predicted = float(np.mean(decreases))
  actual = np_loss(theta_k, xs[0], ys[0])[0] - np_loss(theta_k + s, xs[0], ys[0])[0]
  accept = predicted > 0 and actual > 0
  if predicted > 0 and actual > CFG.eta2 * predicted:
    radius = min(CFG.beta * radius, CFG.max_radius)
  elif not (predicted > 0 and actual >= CFG.eta1 * predicted):
    radius = max(CFG.alpha * radius, CFG.min_radius)
  return theta_k + s if accept else theta_k, radius, predicted, actual, taken


def stream_of(xs, ys):
  return aptsjax.data.stream([(jnp.asarray(xs[h]), jnp.asarray(ys[h])) for h in range(H)])


@pytest.mark.parametrize("consistency", [True, False])
@pytest.mark.parametrize("vectorize", [False, True])
def test_update_matches_the_numpy_oracle(x64, consistency, vectorize, monkeypatch):
  if vectorize:   # the loop shape of accelerators, on CPU
    run = local.run
    monkeypatch.setattr(local, "run", lambda *a, **k: run(*a, **dict(k, vectorize=True)))
  xs, ys = data()
  tx = aptsjax.apts(loss_fn, N, local_solver="adam_tr", local_radius="split", global_steps=0,
                    init_radius=0.3, consistency=consistency)
  theta = np.array([0.5, -0.2, 0.1, 0.3])
  params = jnp.asarray(theta)
  state = tx.init(params)
  radius = float(state.radius)
  moments = [(np.zeros(DIM), np.zeros(DIM), 0)] * N
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(None, state, params, batch=stream_of(xs, ys))
    params = optax.apply_updates(params, updates)
    theta, radius, predicted, actual, taken = oracle_update(theta, xs, ys, radius, consistency,
                                                                 moments)
    np.testing.assert_allclose(np.asarray(params), theta, rtol=1e-10, atol=1e-12)
    assert float(state.radius) == pytest.approx(radius, rel=1e-12)
    assert float(state.predicted_reduction) == pytest.approx(predicted, rel=1e-9, abs=1e-14)
    assert float(state.actual_reduction) == pytest.approx(actual, rel=1e-9, abs=1e-14)
    assert np.asarray(state.local_steps).tolist() == taken
    xs, ys = data(int(state.iteration))          # the next exchange reads new minibatches


def test_one_minibatch_is_the_plain_batch(x64):
  """A Stream of one minibatch is the plain batch: the same update."""
  xs, ys = data()
  batch = (jnp.asarray(xs[0]), jnp.asarray(ys[0]))
  opts = dict(local_solver="adam_tr", local_steps=1, global_steps=0, init_radius=0.3,
              consistency=True)
  results = []
  for b in (batch, aptsjax.data.stream([batch])):
    tx = aptsjax.apts(loss_fn, N, **opts)
    params = jnp.asarray([0.5, -0.2, 0.1, 0.3])
    updates, state = jax.jit(tx.update)(None, tx.init(params), params, batch=b)
    results.append((np.asarray(updates), float(state.radius), float(state.predicted_reduction)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-15)
  assert results[0][1:] == pytest.approx(results[1][1:], rel=1e-12)


def test_a_stream_all_reduces_only_what_is_read():
  """On 2 devices (the trainer), first order, no global steps: with the consistency term the
  update all-reduces g^k and s~ (2n) and scalars, without it s~ alone; none in the local loop."""
  from aptsjax.tools import comm
  xs, ys = data()
  params = jnp.zeros(DIM, jnp.float32)
  counts = {}
  for consistency in (True, False):
    trainer = aptsjax.parallel.apts_trainer(loss_fn, N, num_devices=2, local_solver="adam_tr",
                                            global_steps=0, consistency=consistency)
    batch = trainer.shard_batch(stream_of(xs.astype(np.float32), ys.astype(np.float32)))
    compiled = trainer.lower(params, trainer.init(params), batch).compile()
    stats = comm.allreduce_stats(compiled)
    assert all(s.trips is not None for s in stats)   # nothing inside the local loop
    counts[consistency] = sum(s.elements * s.trips for s in stats)
  # Scalars: f(theta^k), the predicted reduction, f(theta^k + s~) and, when g^k is not formed,
  # the flag that every g_i is finite.
  assert counts == {True: 2 * DIM + 3, False: DIM + 4}


def test_a_solver_without_refresh_cannot_read_a_stream():
  solver = local.trust_region_local_solver(CFG, False, 1)._replace(refresh=None)
  with pytest.raises(ValueError, match="cannot read a Stream"):
    local_stream.streamed(solver)


def test_per_parameter_radius_units():
  params = {"a": jnp.zeros((3, 5)), "b": jnp.zeros(1)}
  state = aptsjax.apts(lambda p, b: 0.0, 2, radius_units="per_parameter",
                       init_radius=0.02).init(params)
  assert float(state.radius) == pytest.approx(0.02 * np.sqrt(16), rel=1e-6)
  absolute = aptsjax.apts(lambda p, b: 0.0, 2, radius_units="absolute", init_radius=0.02)
  assert float(absolute.init(params).radius) == pytest.approx(0.02, rel=1e-6)


def test_stream_checks_its_minibatches():
  with pytest.raises(ValueError, match="at least one"):
    aptsjax.data.stream([])
  with pytest.raises(ValueError, match="differs from minibatch 0"):
    aptsjax.data.stream([np.zeros((4, 2)), np.zeros((3, 2))])
  s = aptsjax.data.stream([np.zeros((4, 2)), np.ones((4, 2))])
  assert isinstance(s.minibatches, np.ndarray) and s.minibatches.shape == (4, 2, 2)
  assert s.length == 2 and aptsjax.data.row_count(s) == 4
  np.testing.assert_array_equal(aptsjax.data.minibatch(s.minibatches, 1), np.ones((4, 2)))


def test_reusing_state_grad_on_the_same_batch_is_the_same_update(x64):
  """On one fixed batch, g^(k+1) is the gradient apts already all-reduced at the trial point
  (state.grad): passing it saves the all-reduce of g^k and changes nothing (2n per update
  with global_steps=0 instead of 3n)."""
  xs, ys = data()
  batch = (jnp.asarray(xs[0]), jnp.asarray(ys[0]))
  tx = aptsjax.apts(loss_fn, N, global_steps=0, init_radius=0.3)
  update = jax.jit(tx.update)
  runs = []
  for reuse in (False, True):
    params = jnp.asarray([0.5, -0.2, 0.1, 0.3])
    state = tx.init(params)
    out = []
    for k in range(5):
      grads = state.grad if reuse and k > 0 else None
      updates, state = update(grads, state, params, batch=batch)
      params = optax.apply_updates(params, updates)
      out.append(np.asarray(params))
    runs.append(np.stack(out))
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-12, atol=1e-14)
  assert aptsjax.optim.apts.exchanged_vectors(global_steps=0) == 3


def test_two_devices_match_one_on_a_stream(x64):
  """The trainer on 2 devices (shard_map, the stream's rows sharded) takes the updates of
  apts on one device (float64; the sums over subdomains only change order)."""
  xs, ys = data()
  runs = []
  for devices in (1, 2):
    trainer = aptsjax.parallel.apts_trainer(loss_fn, N, num_devices=devices,
                                            outer_momentum=0.5)
    params = jnp.asarray([0.5, -0.2, 0.1, 0.3])
    state = trainer.init(params)
    out = []
    for k in range(3):
      xk, yk = data(k)
      params, state = trainer.step(params, state, trainer.shard_batch(stream_of(xk, yk)))
      out.append(np.asarray(params))
    runs.append(np.stack(out))
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-12, atol=1e-14)
