"""aptsjax.checkpoint.restore into a tree that does not match the saved one (issue 22).

The saved tree's metadata is compared with ``like`` before anything is read: one ValueError
names every differing leaf with its stored and requested shape and dtype and what to change
(N, memory, the model, the options), and orbax's tracebacks stay off stderr.
"""

import contextlib
import gc
import sys

import jax.numpy as jnp
import pytest

from aptsjax import checkpoint
from aptsjax import parallel
from tests.parallel import multiprocess_worker as worker

pytestmark = pytest.mark.slow   # saves and restores on disk (orbax): about 10 s


def trainer(num_subdomains=2, memory=3, second_order=True):
  return parallel.apts_trainer(worker.mlp_loss, num_subdomains, num_devices=2,
                               second_order=second_order, memory=memory,
                               local_solver="trust_region", local_radius="bound", remainder="drop")


def tree(t, hidden=8):
  params = worker.problem(rows=64, hidden=hidden)[0]
  return {"params": t.replicate(params), "state": t.init(params)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint of N = 2, memory = 3, second order, hidden width 8."""
  directory = tmp_path_factory.mktemp("ckpt")
  checkpoint.save(directory, 1, tree(trainer()))
  return directory


@contextlib.contextmanager
def quiet(capfd):
  """Asserts that the block writes fewer than 5 lines to stderr and that no exception is reported
  while objects are collected (the "Exception ignored in <coroutine ...>" tracebacks of orbax's
  abandoned reads, which pytest would turn into warnings)."""
  ignored, hook = [], sys.unraisablehook
  sys.unraisablehook = ignored.append
  capfd.readouterr()
  try:
    yield
    gc.collect()
  finally:
    sys.unraisablehook = hook
  err = capfd.readouterr().err
  assert len(err.splitlines()) < 5, err[:3000]
  assert not ignored, [str(u.exc_value)[:200] for u in ignored]


def restore_error(directory, like, capfd) -> str:
  """The message of the ValueError of restoring ``like``, raised by the metadata check (before
  orbax reads anything), without orbax's advice."""
  with quiet(capfd), pytest.raises(ValueError) as info:
    checkpoint.restore(directory, like)
  message = str(info.value)
  assert "nothing was restored" in message and "strict=False" not in message, message
  return message


def test_other_num_subdomains_names_the_leaves_and_n(saved, capfd):
  message = restore_error(saved, tree(trainer(num_subdomains=4)), capfd)
  assert "state.local_state.s['w1']: stored (2, 3, 4, 8) float32, requested (4, 3, 4, 8) " \
         "float32 (N)" in message
  assert "state.local_steps: stored (2,) int32, requested (4,) int32 (N)" in message
  assert "saved for 2 subdomains and `like` has 4" in message
  assert "num_subdomains" in message
  assert "params" not in message.split("What to change")[0]  # the params match


def test_other_memory_names_the_stacks_and_memory(saved, capfd):
  message = restore_error(saved, tree(trainer(memory=5)), capfd)
  assert "state.local_state.stamp: stored (2, 3) int32, requested (2, 5) int32 (memory)" in message
  assert ("state.local_state.s['w1']: stored (2, 3, 4, 8) float32, requested (2, 5, 4, 8) "
          "float32 (memory)") in message
  assert "saved with memory=3 and `like` has memory=5; build `like` with memory=3" in message
  assert "... and" in message  # 32 leaves differ; the list is cut at MAX_LISTED
  assert message.count("(memory)") == checkpoint.MAX_LISTED


def test_other_model_names_the_parameters(saved, capfd):
  message = restore_error(saved, tree(trainer(), hidden=16), capfd)
  assert "params['w1']: stored (4, 8) float32, requested (4, 16) float32 (model)" in message
  assert "model: the parameters' shapes or dtypes differ" in message


def test_other_options_name_the_missing_subtree(saved, capfd):
  message = restore_error(saved, tree(trainer(second_order=False)), capfd)
  assert "(18 leaves): in the checkpoint but not in `like`" in message
  assert "global_memory" in message and "second_order" in message


def test_dtype_mismatch_raises_instead_of_casting(tmp_path, capfd):
  params = worker.problem(rows=64)[0]
  checkpoint.save(tmp_path, 1, {"p": params})
  like = {"p": {k: jnp.asarray(v, jnp.float16) for k, v in params.items()}}
  message = restore_error(tmp_path, like, capfd)
  assert "p['w1']: stored (4, 8) float32, requested (4, 8) float16 (model)" in message
