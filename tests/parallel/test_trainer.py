"""Tests of aptsjax.parallel.trainer (``apts_trainer``) and its step wrappers
(aptsjax.parallel.step): argument checks, donation, SAPTS minibatches, skipped updates, compiler
options, what a step communicates, and the rows of a process.

Equivalence of D devices with one: tests/parallel/test_devices.py and test_mesh.py.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax import data
from aptsjax import parallel
from aptsjax.tools import comm
from tests.parallel import multiprocess_worker as worker
from tests.parallel.runs import cached_trainer
from tests.problems import assert_close
from tests.problems import lsq_loss
from tests.problems import lsq_problem
from tests.problems import mlp_loss
from tests.problems import problem


# Arguments: non-integer sizes are checked before any device is queried.
def test_sizes_must_be_integers_and_are_checked_first(monkeypatch):
  def no_device_query(*args, **kwargs):
    raise AssertionError("default_num_devices was called before the arguments were checked")

  monkeypatch.setattr(parallel, "default_num_devices", no_device_query)
  cases = [(dict(num_subdomains=2.5), "num_subdomains must be an integer >= 1, got 2.5"),
           (dict(num_subdomains=0), "num_subdomains must be an integer >= 1, got 0"),
           (dict(num_subdomains=2, num_devices=1.5), "num_devices must be an integer >= 1, got 1.5"),
           (dict(num_subdomains=2, num_devices=0), "num_devices must be an integer >= 1, got 0"),
           (dict(num_subdomains=2, overlap="0.1x"), "overlap must be a number"),
           (dict(num_subdomains=2, on_nonfinite="stop"), "on_nonfinite must be one of"),
           (dict(num_subdomains=2, remainder="keep"), "remainder must be one of")]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      parallel.apts_trainer(lsq_loss, **kwargs)
  for name in ("local_steps", "memory"):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 2.5"):
      parallel.apts_trainer(lsq_loss, 2, num_devices=1, **{name: 2.5})
  with pytest.raises(ValueError, match="divisible"):
    parallel.apts_trainer(mlp_loss, 6, num_devices=4)


# A non-finite loss at the current point.
@pytest.mark.parametrize("num_devices", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["warn", "raise", "ignore"])
def test_trainer_reports_a_skipped_update(mode, num_devices):
  params, (x, y) = lsq_problem()
  x = x.at[3, 1].set(jnp.nan)
  trainer = parallel.apts_trainer(lsq_loss, 2, num_devices=num_devices, second_order=False,
                                  local_steps=2, on_nonfinite=mode)
  state, batch = trainer.init(params), trainer.shard_batch((x, y))
  before = parallel.numpy_tree(params)  # trainer.step donates params
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if mode == "raise":
      with pytest.raises(FloatingPointError, match=r"APTS update 1 .*update was skipped"):
        trainer.step(params, state, batch)
    else:
      new_params, new_state = trainer.step(params, state, batch)
      jax.block_until_ready(new_state)
      jax.effects_barrier()  # the warning comes from a host callback
      assert bool(new_state.nonfinite) and int(new_state.iteration) == 1
      assert all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(parallel.numpy_tree(new_params)), jax.tree.leaves(before)))
  messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  if mode == "warn":
    assert len(messages) == 1, messages
    assert "APTS update 1 (state.iteration = 1)" in messages[0]
    assert "params and state are unchanged" in messages[0] and "NaN/Inf" in messages[0]
  else:
    assert not messages, messages


@pytest.mark.parametrize("num_devices", [1, 2])
def test_trainer_compiles_with_the_given_options(monkeypatch, num_devices):
  """``compiler_options`` reaches XLA (an unknown option is refused at the first step); by
  default a CPU trainer compiles with ``CPU_COMPILER_OPTIONS``."""
  params, batch = lsq_problem()
  trainer = parallel.apts_trainer(lsq_loss, 2, num_devices=num_devices, second_order=False,
                                  compiler_options={"xla_no_such_option": True})
  with pytest.raises(Exception, match="xla_no_such_option"):
    trainer.step(params, trainer.init(params), trainer.shard_batch(batch))
  seen = []
  jit = jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: seen.append(k.get("compiler_options")) or jit(*a, **k))
  parallel.apts_trainer(lsq_loss, 2, num_devices=num_devices, second_order=False)
  assert parallel.CPU_COMPILER_OPTIONS in seen and parallel.CPU_COMPILER_OPTIONS


# A layout that drops rows warns (the layout itself: tests/test_data.py).
@pytest.mark.parametrize("rows, n, overlap, dropped, sizes", [
    (661, 4, 0.0, 1, "660 or 664"), (510, 4, 0.0, 2, "508 or 512"),
    (661, 2, 0.05, 1, "660 or 662")])
def test_shard_batch_warns_of_dropped_rows(rows, n, overlap, dropped, sizes):
  batch = (np.arange(rows, dtype=np.float32)[:, None], np.zeros(rows, np.int32))
  expected = f"drops {dropped} of the {rows} rows of the batch; batches of {sizes} rows drop none"
  for num_devices in (1, n):
    trainer = parallel.apts_trainer(lsq_loss, n, num_devices=num_devices, overlap=overlap)
    with pytest.warns(UserWarning, match=expected):
      trainer.shard_batch(batch)


# What a step communicates: nothing in the local loop, a volume independent of local_steps.
@pytest.mark.slow
def test_no_allreduce_in_local_loop_and_fixed_volume():
  params, batch = problem()
  n = sum(x.size for x in jax.tree.leaves(params))
  totals = []
  for local_steps in (2, 6):
    trainer = parallel.apts_trainer(mlp_loss, 4, num_devices=4, second_order=False,
                                    local_steps=local_steps)
    state = trainer.init(params)
    compiled = trainer.step.lower(params, state, trainer.shard_batch(batch)).compile()
    records = comm.allreduce_stats(compiled)
    assert records, "expected all-reduces in a 4-device update"
    # The local loop (a while loop whose trip count depends on the data) is there, and
    # communicates nothing; the global phase is a loop of 1 + global_steps known trips.
    assert any(" while(" in line and "known_trip_count" not in line
               for line in compiled.as_text().splitlines())
    assert not any(r.trips is None for r in records), records
    assert any(r.in_loop and r.trips == 2 for r in records), records
    totals.append(sum(r.elements * r.trips for r in records))
  assert totals[0] == totals[1]
  # g^k, s~, the gradient at theta^k + s~ and one global step: 4 n floats plus a few scalars.
  assert 4 * n <= totals[0] <= 4 * n + 16, (totals, n)


@pytest.mark.parametrize("num_devices", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_trainer_donates_params_and_state(num_devices):
  """step reuses the buffers of the params and state it is given; the results do not change."""
  params, batch = problem(rows=512)
  trainer = cached_trainer(num_devices, True)
  sharded = trainer.shard_batch(batch)
  p, s = trainer.replicate(jax.tree.map(jnp.copy, params)), trainer.init(params)
  tx = trainer.tx if num_devices == 1 else aptsjax.apts(mlp_loss, 4, second_order=True)
  updates, want_state = jax.jit(lambda q, t: tx.update(None, t, q, batch=batch))(params,
                                                                                tx.init(params))
  got_params, got_state = trainer.step(p, s, sharded)
  # Every parameter-sized buffer is reused (the flags that the update only writes are not
  # inputs of the compiled step at all).
  assert all(x.is_deleted() for x in jax.tree.leaves((p, s.grad, s.local_state, s.global_memory)))
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  assert_close(parallel.numpy_tree(got_params), optax.apply_updates(params, updates), 1e-5)
  assert_close(parallel.numpy_tree(got_state.value), want_state.value, 1e-5)
  # NumPy inputs are copied to the devices (and stay usable); an eagerly built state (one
  # buffer in several fields) is accepted.
  host, eager = parallel.numpy_tree(params), trainer.tx.init(params)
  if trainer.mesh is not None:
    eager = jax.device_put(eager, jax.tree.map(lambda spec: jax.NamedSharding(trainer.mesh, spec),
                                               aptsjax.state_specs(eager, "data")))
  trainer.step(host, eager, sharded)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host),
                                                  jax.tree.leaves(parallel.numpy_tree(params))))


def test_sapts_minibatches_with_overlap():
  params, (x, y) = problem(rows=240)
  trainer = parallel.apts_trainer(mlp_loss, 4, num_devices=1, overlap=0.05, second_order=False)
  state = trainer.init(params)
  start = float(mlp_loss(params, (x, y)))
  for epoch in range(3):
    for batch in aptsjax.data.iterate_minibatches((x, y), 80, overlap=0.05, seed=0, epoch=epoch):
      params, state = trainer.step(params, state, trainer.shard_batch(batch))
  assert float(mlp_loss(params, (x, y))) < 0.7 * start


def test_single_process_rows_are_the_whole_layout():
  for num_devices in (1, 4):
    trainer = parallel.apts_trainer(worker.mlp_loss, 4, num_devices=num_devices, overlap=0.05)
    np.testing.assert_array_equal(trainer.process_rows(1000), data.overlap_layout(1000, 4, 0.05))
  params, (x, y) = worker.problem(rows=1000)
  rows = trainer.process_rows(1000)
  local = trainer.shard_local_batch((x[rows], y[rows]), 1000)
  whole = trainer.shard_batch((x, y))
  np.testing.assert_array_equal(np.asarray(local[0]), np.asarray(whole[0]))
  assert local[0].sharding == whole[0].sharding and len(local[0].sharding.device_set) == 4
  with pytest.raises(ValueError, match="must supply 1036 rows"):
    trainer.shard_local_batch((x[rows[:-4]], y[rows[:-4]]), 1000)
