"""Two efficiency-benchmark tasks beyond MLPs, as Flax NNX models.

* `mnist_cnn`: Conv(8, 3x3) - relu - avg pool 2 - Conv(16, 3x3) - relu - avg pool 2 -
  Dense(10) on MNIST-5k (`benchmarks.common.datasets.load_mnist5k`, the rows reshaped to
  28x28x1 inside the model); 9,098 parameters, 4,000 training rows (the last 500 validation),
  1,000 test rows; softmax cross-entropy, metric accuracy.
* `char_transformer`: a decoder-only transformer predicting the next character (2 pre-LayerNorm
  blocks, d_model 64, 4 heads, gelu MLP 256, context 64, learned positional embeddings, causal
  mask); 115,286 parameters for its 86 tokens. The text is the Python documentation that ships
  with CPython itself, ``pydoc_data.topics`` (the language reference topics ``help()`` shows;
  465,048 characters in CPython 3.11), joined in sorted key order, its first 200,000
  characters: present without any extra package, deterministic for a CPython minor version
  (another version's text differs a little). The vocabulary is the 85 characters occurring at
  least 20 times, plus one token for the 150 rarer ones. Rows are the 3,076 non-overlapping
  windows of 65 characters in a seeded order: 2,769 training (the last 276 validation) and 307
  test windows. Metric: the mean test loss (or, with ``metric="accuracy"``, the fraction of
  characters predicted exactly).

No BatchNorm, no dropout and no other non-parameter state: the trust-region ratio test needs a
deterministic loss of the parameters alone, and `aptsjax.flax.nnx_loss_fn` checks it.
``init(seed)`` returns the ``nnx.Param`` variables as a plain nested dict of float32 arrays
(``nnx.to_pure_dict``); ``loss_fn`` merges it with the model's graph definition.

Measured with ``python -m benchmarks.efficiency.nnx_tasks`` (plain ``optax.adamw``, lr 3e-3,
one CPU device, a jitted step, all training rows per epoch, the fastest epoch after the first)
on a 2-core CPU shared with other jobs (load average 5 to 7), so an idle machine is faster:

================  ==========  =============  ===========  ===========  =======================
task              parameters  training rows  batch        time/epoch   test after 3 epochs
================  ==========  =============  ===========  ===========  =======================
mnist_cnn         9,098       4,000          1,000 rows   0.4-1.0 s    loss 1.11, accuracy 0.76
char_transformer  115,286     2,769          128 windows  4.7-5.8 s    loss 2.66, accuracy 0.28
================  ==========  =============  ===========  ===========  =======================

The first epoch adds 1-2 s (mnist_cnn) and 2-4 s (char_transformer) of compilation. The whole
text (``max_chars=None``: 6,439 training windows) takes about 2.3 times as long per epoch.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from aptsjax.flax import nnx_loss_fn
from benchmarks.common import datasets
from benchmarks.efficiency.task import Task

Batch = tuple[jax.Array, jax.Array]
Params = dict[str, Any]
ModelMetric = Callable[[nnx.Module, Batch], jax.Array]

ADAMW_DECAY = 1e-4   # optax.adamw's default weight decay, for the AdamW baselines
CNN_NUM_VAL = datasets.MNIST5K_NUM_VAL
CONTEXT = 64
MAX_CHARS = 200_000
MIN_COUNT = 20
TEST_FRACTION = 0.1
VAL_FRACTION = 0.1


# Shared NNX plumbing.

def pure_params(model: nnx.Module) -> Params:
  """The model's ``nnx.Param`` variables as a plain nested dict of arrays.

  Args:
    model: a Flax NNX module.

  Returns:
    ``nnx.to_pure_dict`` of its Param state, the pytree an optax transformation updates.
  """
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def nnx_functions(make_model: Callable[[nnx.Rngs], nnx.Module], loss: ModelMetric,
                  metric: ModelMetric) -> tuple[Callable[[int], Params], Callable, Callable]:
  """The ``init``, ``loss_fn`` and ``metric_fn`` of a Task from an NNX model constructor.

  Args:
    make_model: builds the model from its ``nnx.Rngs``.
    loss: ``loss(model, batch) -> scalar``, the mean training loss over rows.
    metric: ``metric(model, batch) -> scalar``.

  Returns:
    (init, loss_fn, metric_fn): ``init(seed)`` the pure parameters of the model built with
    ``nnx.Rngs(seed)``; the two functions take ``(params, batch)``.
  """
  model = make_model(nnx.Rngs(0))
  return (lambda seed: pure_params(make_model(nnx.Rngs(seed))),
          nnx_loss_fn(model, loss), nnx_loss_fn(model, metric))


def cross_entropy(model: nnx.Module, batch: Batch) -> jax.Array:
  """Mean softmax cross-entropy of ``model(x)`` against integer labels, over all positions."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def accuracy(model: nnx.Module, batch: Batch) -> jax.Array:
  """Fraction of positions whose arg-max logit is the label, in [0, 1]."""
  x, y = batch
  return jnp.mean(jnp.argmax(model(x), axis=-1) == y, dtype=jnp.float32)


# MNIST CNN.

class MnistCNN(nnx.Module):
  """Two 3x3 convolutions with relu and 2x2 average pooling, then a dense layer to the logits."""

  def __init__(self, rngs: nnx.Rngs, channels: tuple[int, int] = (8, 16),
               num_classes: int = 10):
    """Builds the layers.

    Args:
      rngs: the initializers' random streams (not kept by the model).
      channels: output channels of the two convolutions.
      num_classes: number of logits.
    """
    self.conv1 = nnx.Conv(1, channels[0], (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), rngs=rngs)
    self.dense = nnx.Linear(7 * 7 * channels[1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps rows of 784 pixels (rows, 784) to logits (rows, num_classes)."""
    x = x.reshape(-1, 28, 28, 1)
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    return self.dense(x.reshape(x.shape[0], -1))


def mnist_cnn(seed: int = 0) -> Task:
  """The MNIST-5k CNN task: cross-entropy loss, accuracy metric.

  Args:
    seed: seed of the MNIST-5k train/test permutation.

  Returns:
    Task "mnist_cnn": 4,000 training rows (the last 500 validation), 1,000 test rows.
  """
  ds = datasets.load_mnist5k(seed=seed)
  init, loss_fn, metric_fn = nnx_functions(MnistCNN, cross_entropy, accuracy)
  return Task("mnist_cnn", init, loss_fn, metric_fn, "accuracy", True,
              (ds.x_train, ds.y_train), (ds.x_test, ds.y_test), CNN_NUM_VAL, ADAMW_DECAY)


# The text.

def corpus_text(max_chars: int | None = MAX_CHARS) -> str:
  """CPython's bundled documentation topics (``pydoc_data.topics``), joined in key order.

  Args:
    max_chars: keep the first ``max_chars`` characters; None keeps all (465,048 in CPython
      3.11).

  Returns:
    The text.
  """
  from pydoc_data.topics import topics
  return "\n".join(topics[key] for key in sorted(topics))[:max_chars]


def char_vocab(text: str, min_count: int = MIN_COUNT) -> str:
  """The characters occurring at least ``min_count`` times, sorted.

  Args:
    text: the corpus.
    min_count: rarer characters share one extra token (id 0).

  Returns:
    The kept characters; character ``vocab[i]`` has id ``i + 1``.
  """
  counts = collections.Counter(text)
  return "".join(sorted(c for c, n in counts.items() if n >= min_count))


def encode(text: str, vocab: str) -> np.ndarray:
  """Maps characters to int32 ids: ``vocab[i]`` to ``i + 1``, any other character to 0."""
  ids = {c: i + 1 for i, c in enumerate(vocab)}
  return np.fromiter((ids.get(c, 0) for c in text), np.int32, len(text))


def char_windows(ids: np.ndarray, length: int, seed: int = 0) -> np.ndarray:
  """Cuts ids into non-overlapping windows and permutes them with a seed.

  Args:
    ids: the encoded text.
    length: characters per window (context + 1).
    seed: seed of the permutation (numpy default_rng).

  Returns:
    int32 array (len(ids) // length, length); the incomplete tail is dropped.
  """
  windows = ids[:len(ids) // length * length].reshape(-1, length)
  return windows[np.random.default_rng(seed).permutation(len(windows))]


def next_char_rows(windows: np.ndarray) -> Batch:
  """(inputs, targets): each window without its last, and without its first character."""
  return windows[:, :-1], windows[:, 1:]


# The transformer.

class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal multi-head self-attention, then a gelu MLP."""

  def __init__(self, d_model: int, num_heads: int, rngs: nnx.Rngs):
    """Builds the layers (MLP width 4 * d_model).

    Args:
      d_model: the width of the residual stream.
      num_heads: attention heads; d_model must be divisible by it.
      rngs: the initializers' random streams.
    """
    self.num_heads = num_heads
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def attention(self, x: jax.Array) -> jax.Array:
    """Causal self-attention of (rows, positions, d_model) inputs."""
    rows, length, width = x.shape
    heads = self.qkv(x).reshape(rows, length, 3, self.num_heads, width // self.num_heads)
    q, k, v = heads[:, :, 0], heads[:, :, 1], heads[:, :, 2]
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(rows, length, width))

  def __call__(self, x: jax.Array) -> jax.Array:
    """The block applied to the residual stream (rows, positions, d_model)."""
    x = x + self.attention(self.ln1(x))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class CharTransformer(nnx.Module):
  """Decoder-only character transformer: token and learned position embeddings, blocks,
  a final LayerNorm and a linear head to the vocabulary's logits."""

  def __init__(self, rngs: nnx.Rngs, vocab_size: int, context: int = CONTEXT,
               d_model: int = 64, num_heads: int = 4, num_layers: int = 2):
    """Builds the layers.

    Args:
      rngs: the initializers' random streams (not kept by the model).
      vocab_size: number of tokens.
      context: the longest input sequence.
      d_model: the width of the residual stream.
      num_heads: attention heads per block.
      num_layers: transformer blocks.
    """
    small = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(vocab_size, d_model, embedding_init=small, rngs=rngs)
    self.position = nnx.Param(small(rngs.params(), (context, d_model), jnp.float32))
    self.blocks = nnx.List([Block(d_model, num_heads, rngs) for _ in range(num_layers)])
    self.ln = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, kernel_init=small, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Maps int ids (rows, positions) to next-token logits (rows, positions, vocab_size)."""
    x = self.embed(ids) + self.position[:ids.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


def char_transformer(metric: str = "loss", seed: int = 0, context: int = CONTEXT,
                     max_chars: int | None = MAX_CHARS) -> Task:
  """The next-character task on CPython's documentation topics.

  Args:
    metric: "loss" (the mean next-character cross-entropy, lower is better) or "accuracy"
      (the fraction of characters predicted exactly).
    seed: seed of the windows' order.
    context: characters the model reads; the windows hold ``context + 1``.
    max_chars: characters of the text used (its beginning); None: all of it.

  Returns:
    Task "char_transformer": the last 10% of the windows are the test split, the last 10% of
    the others the validation split.
  """
  if metric not in ("loss", "accuracy"):
    raise ValueError(f"metric must be 'loss' or 'accuracy', not {metric!r}")
  text = corpus_text(max_chars)
  vocab = char_vocab(text)
  windows = char_windows(encode(text, vocab), context + 1, seed)
  num_test = int(len(windows) * TEST_FRACTION)
  train, test = windows[:-num_test], windows[-num_test:]
  make = lambda rngs: CharTransformer(rngs, len(vocab) + 1, context)
  init, loss_fn, metric_fn = nnx_functions(
      make, cross_entropy, cross_entropy if metric == "loss" else accuracy)
  return Task("char_transformer", init, loss_fn, metric_fn, metric, metric == "accuracy",
              next_char_rows(train), next_char_rows(test), int(len(train) * VAL_FRACTION),
              ADAMW_DECAY)


# Measurement (python -m benchmarks.efficiency.nnx_tasks).

def adamw_epochs(task: Task, batch_size: int, epochs: int = 3, lr: float = 3e-3,
                 seed: int = 0) -> tuple[Params, list[float]]:
  """Trains on all training rows with plain ``optax.adamw``, one jitted step per minibatch.

  Args:
    task: the task.
    batch_size: rows per step; the incomplete last minibatch of an epoch is dropped.
    epochs: passes over the training rows, each in a new seeded order.
    lr: the learning rate.
    seed: seed of the initial parameters and the row orders.

  Returns:
    (params, seconds of each epoch, compilation included in the first).
  """
  tx = optax.adamw(lr)
  params = task.init(seed)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(task.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng, rows, times = np.random.default_rng(seed), task.rows(task.train), []
  for _ in range(epochs):
    start, order = time.perf_counter(), rng.permutation(rows)
    for i in range(0, rows - batch_size + 1, batch_size):
      batch = jax.tree.map(lambda x: x[order[i:i + batch_size]], task.train)
      params, state = step(params, state, batch)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - start)
  return params, times


def report(task: Task, batch_size: int, epochs: int = 3, lr: float = 3e-3) -> str:
  """Trains with `adamw_epochs` and summarizes the run in one line.

  Args:
    task: the task.
    batch_size: rows per step.
    epochs: passes over the training rows (at least 2: the first includes compilation).
    lr: the learning rate.

  Returns:
    Parameters, training rows, seconds per epoch, test loss and metric after training.
  """
  params, times = adamw_epochs(task, batch_size, epochs, lr)
  count = sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params))
  loss_fn, metric_fn = jax.jit(task.loss_fn), jax.jit(task.metric_fn)
  return (f"{task.name}: {count:,} parameters, {task.rows(task.train):,} training rows, "
          f"{min(times[1:]):.2f} s/epoch (fastest after the first, {times[0]:.2f} s), "
          f"after {epochs} epochs lr {lr}: test loss {float(loss_fn(params, task.test)):.4f}, "
          f"test {task.metric} {float(metric_fn(params, task.test)):.4f}")


if __name__ == "__main__":
  print(report(mnist_cnn(), 1000))
  print(report(char_transformer(metric="accuracy"), 128))
