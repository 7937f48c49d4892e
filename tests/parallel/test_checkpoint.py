"""aptsjax.parallel.checkpoint in one process: sharded APTS states round-trip bit for bit (on a
1-D and a 2-D mesh), errors are clear.

The multi-process resume is tested in tests/parallel/test_multiprocess.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from aptsjax import parallel
from aptsjax.parallel import checkpoint
from tests.parallel import multiprocess_worker as worker
from tests.parallel.runs import mesh_trainer
from tests.problems import problem


def equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def placed():
  """A 4-device trainer, and its replicated parameters and fresh state (nothing compiled)."""
  params = worker.problem(rows=512)[0]
  trainer = worker.make_trainer(2, num_devices=4)
  return trainer, trainer.replicate(params), trainer.init(params)


@pytest.fixture(scope="module")
def trained(placed):
  """The state after two steps, and the laid-out batch."""
  trainer, params, state = placed
  sharded = trainer.shard_batch(worker.problem(rows=512)[1])
  params, state = jax.tree.map(jnp.copy, (params, state))   # the step donates them
  for _ in range(2):
    params, state = trainer.step(params, state, sharded)
  return trainer, params, state, sharded


@pytest.mark.slow
def test_round_trip_keeps_values_shardings_and_trajectory(trained, tmp_path):
  trainer, params, state, sharded = trained
  checkpoint.save(tmp_path, 2, {"params": params, "state": state})
  assert checkpoint.latest_step(tmp_path) == 2
  fresh = worker.problem(rows=512)[0]
  like = {"params": trainer.replicate(fresh), "state": trainer.init(fresh)}
  back = checkpoint.restore(tmp_path, like)
  assert type(back["state"]) is type(state)
  assert equal(back, {"params": params, "state": state})
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves({"params": params, "state": state})):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
  assert back["state"].local_state is not None
  assert len(jax.tree.leaves(back["state"].local_state)[0].sharding.device_set) == 4
  one = trainer.step(*jax.tree.map(jnp.copy, (params, state)), sharded)  # the fixture's stay
  two = trainer.step(back["params"], back["state"], sharded)
  assert equal(one, two)


def test_latest_and_explicit_steps(placed, tmp_path):
  _, params, _ = placed
  assert checkpoint.latest_step(tmp_path / "missing") is None
  for step in (1, 3, 5):
    checkpoint.save(tmp_path, step, {"p": jax.tree.map(lambda x: x * step, params)})
  assert checkpoint.latest_step(tmp_path) == 5
  back = checkpoint.restore(tmp_path, {"p": params}, step=3)
  assert equal(back["p"], jax.tree.map(lambda x: x * 3, params))
  with pytest.raises(ValueError, match="must increase"):
    checkpoint.save(tmp_path, 4, {"p": params})


def test_errors(placed, tmp_path):
  _, params, _ = placed
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    checkpoint.restore(tmp_path / "missing", {"p": params})
  checkpoint.save(tmp_path, 1, {"p": params})
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save(tmp_path, 1, {"p": params})
  with pytest.raises(ValueError, match="non-negative"):
    checkpoint.save(tmp_path, -1, {"p": params})
  with pytest.raises(FileNotFoundError, match="no checkpoint 7"):
    checkpoint.restore(tmp_path, {"p": params}, step=7)
  wrong = {"p": {k: np.zeros((3,) + np.shape(v), np.float32) for k, v in params.items()}}
  with pytest.raises(ValueError, match="does not match"):
    checkpoint.restore(tmp_path, wrong)


def test_max_to_keep(placed, tmp_path):
  _, params, _ = placed
  for step in range(4):
    checkpoint.save(tmp_path, step, {"p": params}, max_to_keep=2)
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]


def test_numpy_tree_of_a_sharded_state(placed):
  _, _, state = placed
  host = parallel.numpy_tree(state)
  assert host.local_steps.shape == (worker.NUM_SUBDOMAINS,)
  assert isinstance(host.radius, np.ndarray)


@pytest.mark.slow
def test_checkpoint_restores_the_2d_shardings(tmp_path):
  """A checkpoint of a 2 x 2 run comes back sharded as ``like`` and continues bitwise."""
  params, batch = problem(rows=512)
  params = jax.tree.map(np.asarray, params)
  trainer = mesh_trainer("tp", 2, 2, True)
  laid = trainer.shard_batch(batch)
  p, state = trainer.step(params, trainer.init(params), laid)
  checkpoint.save(tmp_path, 1, {"params": p, "state": state})
  want, _ = trainer.step(jax.tree.map(jnp.copy, p), jax.tree.map(jnp.copy, state), laid)
  like = {"params": trainer.replicate(params), "state": trainer.init(params)}
  back = checkpoint.restore(tmp_path, like)
  assert back["state"].global_memory.s["w1"].sharding.spec == P(None, None, "model")
  assert back["params"]["w1"].sharding.spec == P(None, "model")
  got, _ = trainer.step(back["params"], back["state"], laid)
  got, want = parallel.numpy_tree(got), parallel.numpy_tree(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
