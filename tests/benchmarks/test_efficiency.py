"""benchmarks.efficiency: the workers' streams, DiLoCo's round against a numpy oracle, the
all-reduced floats read off the compiled exchanges, and the quick mode end to end (slow, in a
subprocess started beside the in-process tests)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common.progress import Progress
from benchmarks.efficiency import methods, programs, streams, train
from benchmarks.efficiency.task import Task
from tests import background
from tests.helpers import quick_job, read_csv
from tests.rounding import assert_within_rounding, probe_spread

ROWS, FEATURES = 24, 3


def linear_task(rows: int = ROWS, seed: int = 0) -> Task:
  """Least squares on a seeded linear model: loss 0.5 mean (x w - y)^2; feature 0 of row r is r
  (so a minibatch tells which rows it holds)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
  x[:, 0] = np.arange(rows)
  y = (x @ rng.standard_normal(FEATURES) + 0.1 * rng.standard_normal(rows)).astype(np.float32)
  loss = lambda p, b: 0.5 * jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
  init = lambda s: {"w": jnp.asarray(np.random.default_rng(s).standard_normal(FEATURES),
                                     jnp.float32)}
  return Task("linear", init, loss, loss, "loss", False, (x, y), (x[:4], y[:4]), 4)


# (1) The streams.

@pytest.mark.parametrize("rows,workers,batch", [(24, 2, 6), (25, 4, 8), (103, 3, 12)])
def test_shares_are_disjoint_contiguous_and_cover_the_rows(rows, workers, batch):
  parts = streams.shares(rows, workers)
  assert parts.shape == (workers, rows // workers)
  np.testing.assert_array_equal(np.sort(parts.ravel()), np.arange(workers * (rows // workers)))
  stream = streams.make_stream(rows, workers, batch, seed=0, epochs=2)
  assert stream.dropped == rows % workers
  b = batch // workers
  for epoch in (1, 2):
    mbs = stream.indices[stream.epochs == epoch]
    for i, share in enumerate(parts):
      own = mbs[:, i * b:(i + 1) * b]           # worker i's rows of every global minibatch
      assert set(own.ravel()) <= set(share)     # only its own share ...
      assert len(set(own.ravel())) == own.size  # ... each row at most once an epoch
      assert own.size == len(share) - len(share) % b == len(share) - stream.unread


def test_same_seed_same_stream_reshuffled_every_epoch():
  one, two = (streams.make_stream(48, 2, 8, seed=3, epochs=3) for _ in range(2))
  np.testing.assert_array_equal(one.indices, two.indices)
  other = streams.make_stream(48, 2, 8, seed=4, epochs=3)
  assert not np.array_equal(one.indices, other.indices)
  per_epoch = [one.indices[one.epochs == e] for e in (1, 2, 3)]
  for a, b in zip(per_epoch, per_epoch[1:]):
    assert not np.array_equal(a, b)                              # another order ...
    np.testing.assert_array_equal(np.sort(a, axis=None), np.sort(b, axis=None))  # same rows


def test_worker_view_puts_worker_i_rows_first():
  mbs = np.arange(2 * 8).reshape(2, 8)                           # H = 2, B = 8
  view = streams.worker_view(mbs, 4)
  assert view.shape == (4, 2, 2)
  np.testing.assert_array_equal(view[1, 0], mbs[0, 2:4])
  np.testing.assert_array_equal(view[3, 1], mbs[1, 6:8])


def recorder(period: int, seen: list) -> methods.Method:
  """A method that only records the rows (feature 0) of the minibatches it is given."""
  def exchange(state, minibatches):
    seen.extend(np.asarray(minibatches[0][..., 0], int).reshape(period, -1))
    return state
  return methods.Method("recorder", {"H": period}, 2, period, lambda p: p, exchange,
                        lambda s: s, methods.no_diagnostics)


def test_every_method_reads_the_same_stream():
  task = linear_task()
  split = train.Split("test", task.train, lambda params: 0.0)
  seen = {}
  for period in (1, 3, 5):
    seen[period] = []
    rows = train.run(recorder(period, seen[period]), task, split, seed=7, batch=4, epochs=2,
                     floats=10, bars=Progress(1.0))
    assert [r["exchange"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[-1]["floats"] == 10 * len(rows) and rows[-1]["bytes"] == 40 * len(rows)
  stream = streams.make_stream(ROWS, 2, 4, seed=7, epochs=2)
  np.testing.assert_array_equal(seen[1], stream.indices)
  for period in (3, 5):   # the same minibatches, cut into exchanges of H
    np.testing.assert_array_equal(seen[period], stream.indices[:len(seen[period])])
    assert len(seen[period]) == len(stream.indices) // period * period


# (2) DiLoCo's round against numpy.

def adam_numpy(w, state, g, lr, b1=0.9, b2=0.999, eps=1e-8):
  """optax.adam's step in float64: (w, (m, v, t)) after gradient g."""
  m, v, t = state
  m, v, t = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g, t + 1
  step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  return w - lr * step, (m, v, t)


def diloco_numpy(theta, rounds, inner_lr, outer_lr, momentum=0.9):
  """DiLoCo in float64: rounds of (H, W, b) worker minibatches (x, y); inner Adam per worker,
  its state kept across rounds; outer SGD with Nesterov momentum on theta - mean theta_i."""
  x_all, y_all = rounds
  workers = x_all.shape[2]
  inner = [(np.zeros_like(theta), np.zeros_like(theta), 0) for _ in range(workers)]
  trace = np.zeros_like(theta)
  for x_round, y_round in zip(x_all, y_all):
    ends = []
    for i in range(workers):
      w = theta.copy()
      for x, y in zip(x_round[:, i], y_round[:, i]):
        w, inner[i] = adam_numpy(w, inner[i], x.T @ (x @ w - y) / len(y), inner_lr)
      ends.append(w)
    delta = theta - np.mean(ends, axis=0)
    trace = delta + momentum * trace
    theta = theta - outer_lr * (delta + momentum * trace)
  return theta


def test_diloco_rounds_match_a_numpy_oracle():
  """Two rounds of H = 3 inner steps on 2 workers, inner lr 0.05, outer lr 0.7.

  Error model (tests/rounding.py): the float32 run and the float64 oracle differ by the float32
  rounding of every operation, which the iteration carries like an ulp-sized perturbation of its
  inputs. So the bound is FACTOR x the run's own response to 4-ulp perturbations of the initial
  parameters (measured here) + 16 ulps of the result's norm; a wrong step (a missing bias
  correction, the plain instead of the Nesterov momentum, a state reset between rounds) moves
  the result by O(lr) and fails by orders of magnitude.
  """
  task, workers, period, b = linear_task(), 2, 3, 2
  x, y = task.train
  x = x.copy()
  x[:, 0] = np.random.default_rng(1).standard_normal(ROWS)  # drop the row-index feature
  rows = np.random.default_rng(2).permutation(ROWS).reshape(2, period, workers * b)
  method = methods.diloco(task, workers, 0.05, period, 0.7)

  def run(params):
    state = method.init(params)
    for idx in rows:
      state = method.exchange(state, (x[idx], y[idx]))
    return {"theta": method.params(state)["w"]}

  params = task.init(0)
  result = run(params)
  as_workers = lambda a: a[rows].reshape(2, period, workers, b, *a.shape[1:]).astype(np.float64)
  expected = diloco_numpy(np.asarray(params["w"], np.float64), (as_workers(x), as_workers(y)),
                          0.05, 0.7)
  reference = {"theta": expected}
  spread = probe_spread(run, params, result)
  assert_within_rounding(result, reference, spread, "DiLoCo vs numpy")
  start = np.asarray(params["w"], np.float64)
  assert np.linalg.norm(expected - start) > 0.05        # the rounds moved the parameters


# (3) All-reduced floats read off the compiled exchanges.

@pytest.mark.parametrize("name,period", [(methods.DDP_ADAM, 1), (methods.DILOCO, 3)])
def test_hlo_count_equals_the_constructed_count(name, period):
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices")
  stats = programs.exchange_stats(linear_task(), name, 2, 8, period)
  assert stats["n"] == FEATURES
  assert stats["floats_per_iter"] == stats["constructed"] == FEATURES
  assert stats["calls_per_iter"] == 1 and stats["in_local_loop"] == 0


def test_selection_prefers_fewest_exchanges_then_best_metric():
  scores = [{"best": 0.9, "exchanges": None}, {"best": 0.8, "exchanges": 12},
            {"best": 0.85, "exchanges": 12}, {"best": 0.95, "exchanges": 30}]
  assert train.choose(scores, True, by_exchanges=True) == 2
  assert train.choose(scores, True, by_exchanges=False) == 3
  nobody = [{"best": 0.5, "exchanges": None}, {"best": math.nan, "exchanges": None}]
  assert train.choose(nobody, True, by_exchanges=True) == 0
  assert train.target_of(0.9, True) == pytest.approx(0.895)
  assert train.target_of(2.0, False) == pytest.approx(2.04)
  assert train.periods_within((5, 10, 20, 40), 12) == (5, 10)


# (4) The quick mode, end to end (slow).

QUICK = quick_job("efficiency.efficiency", "--quick", "--epochs", "2")


@pytest.mark.slow
def test_quick_mode_writes_the_tables_and_figure():
  run = background.result(QUICK)
  out, summary = run.out, run.record["returned"]
  assert {r["method"] for r in summary} == {methods.DDP_ADAM, methods.DILOCO, methods.APTS}
  hlo = {(r["method"], r["H"]): r for r in read_csv(out / "hlo.csv")}
  n = int(hlo[methods.DDP_ADAM, "1"]["n"])
  for (name, _), r in hlo.items():
    if name == methods.APTS:
      assert int(r["in_local_loop"]) == 0 and int(r["floats_per_iter"]) >= n
    else:
      assert int(r["floats_per_iter"]) == int(r["constructed"]) == n
  for r in read_csv(out / "runs.csv"):
    floats = int(hlo[r["method"], r["H"]]["floats_per_iter"])
    assert int(r["floats"]) == int(r["exchange"]) * floats and int(r["bytes"]) == 4 * int(r["floats"])
    assert 0.0 <= float(r["accuracy"]) <= 1.0
  for name in ("selection", "summary", "apts_periods", "latency"):
    read_csv(out / f"{name}.csv")
  assert (out / "efficiency.png").stat().st_size > 0
