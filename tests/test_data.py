"""Tests of aptsjax.data: the overlap layout (docs/method.md) and the SAPTS minibatches."""

import warnings
from fractions import Fraction

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aptsjax import data


def reference_layout(m: int, n: int, o: float) -> list[list[int]] | None:
  """The overlap layout rule in plain loops; None when a block would have no own rows."""
  of = Fraction(repr(o))
  c = 0
  while (c + 1) * (n + of) <= of * m:  # c = floor(o m / (N + o))
    c += 1
  b = 0
  while n * (b + 1) <= m - c:  # b = floor((m - c) / N)
    b += 1
  if b == 0:
    return None
  blocks = []
  for i in range(n):
    block = []
    for r in range(i * b, (i + 1) * b):
      block.append(r)
    for r in range(m - c, m):
      block.append(r)
    blocks.append(block)
  return blocks


def _batch(m: int):
  x = np.arange(m * 3, dtype=np.float32).reshape(m, 3)
  y = np.arange(m, dtype=np.int32)
  return x, {"y": y}


def test_method_example():
  assert data.layout_sizes(1000, 2, 0.05) == (488, 24)
  layout = data.overlap_layout(1000, 2, 0.05)
  assert layout.dtype == np.int64 and layout.shape == (1024,)
  blocks = layout.reshape(2, 512)
  np.testing.assert_array_equal(blocks[0], np.r_[0:488, 976:1000])
  np.testing.assert_array_equal(blocks[1], np.r_[488:976, 976:1000])
  x, y = _batch(1000)
  out_x, out_y = data.overlapping_subdomains((x, y), 2, 0.05)
  np.testing.assert_array_equal(out_x, x[layout])
  np.testing.assert_array_equal(out_y["y"], layout)


@pytest.mark.parametrize("m,n,o", [(1000, 2, 0.05), (1000, 4, 0.05), (1000, 6, 0.05),
                                   (4000, 6, 0.05), (660, 6, 0.05), (13, 1, 0.3), (10, 3, 0.5),
                                   (7, 7, 0.0), (100, 1, 0.99), (5, 2, 0.9)])
def test_matches_reference(m, n, o):
  ref = reference_layout(m, n, o)
  np.testing.assert_array_equal(data.overlap_layout(m, n, o), np.array(ref).reshape(-1))


def test_decimal_overlap_is_exact():
  # 0.3 * 13 / 1.3 = 3 exactly; the double nearest 0.3 is slightly below 0.3.
  assert data.layout_sizes(13, 1, 0.3) == (10, 3)


@pytest.mark.parametrize("m,n", [(1000, 2), (1001, 2), (999, 6), (6, 6), (17, 4)])
def test_zero_overlap_is_plain_split(m, n):
  b = m // n
  np.testing.assert_array_equal(data.overlap_layout(m, n, 0.0), np.arange(n * b))
  batch = _batch(m)
  out = data.overlapping_subdomains(batch, n, remainder="drop")  # drops m % n rows
  np.testing.assert_array_equal(out[0], batch[0][:n * b])
  split = data.split_subdomains(out, n)
  assert split[0].shape == (n, b, 3) and split[1]["y"].shape == (n, b)
  for i in range(n):
    np.testing.assert_array_equal(split[1]["y"][i], np.arange(i * b, (i + 1) * b))
  if m % n == 0:
    assert data.overlapping_subdomains(batch, n) is batch


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(m=st.integers(1, 3000), n=st.integers(1, 16),
                  o=st.floats(0.0, 1.0, exclude_max=True, allow_nan=False))
def test_layout_property(m, n, o):
  ref = reference_layout(m, n, o)
  if ref is None:
    with pytest.raises(ValueError, match="too few"):
      data.overlap_layout(m, n, o)
    return
  layout = data.overlap_layout(m, n, o)
  np.testing.assert_array_equal(layout, np.array(ref).reshape(-1))
  b, c = data.layout_sizes(m, n, o)
  blocks = layout.reshape(n, b + c)
  shared = set(range(m - c, m))
  owns = [set(block[:b].tolist()) for block in blocks]
  for block, own in zip(blocks, owns):
    assert shared <= set(block.tolist())  # every block holds all shared rows
    assert not own & shared
  assert sum(len(own) for own in owns) == len(set().union(*owns)) == n * b  # own rows disjoint
  assert m - c - n * b < n  # fewer than N rows dropped
  assert c <= o * (b + 1)  # shared / own ~ o


def test_jax_leaves_and_jit():
  x, y = _batch(1000)
  batch = (jnp.asarray(x), jnp.asarray(y["y"]))
  layout = data.overlap_layout(1000, 2, 0.05)
  out = data.overlapping_subdomains(batch, 2, 0.05)
  assert all(isinstance(leaf, jax.Array) for leaf in out)
  np.testing.assert_array_equal(out[0], x[layout])

  @jax.jit
  def blockwise_mean(b):
    assert data.check_batch(b, 2) == 1024
    return data.split_subdomains(b, 2)[0].mean(axis=(1, 2))

  np.testing.assert_allclose(blockwise_mean(out), x[layout].reshape(2, 512, 3).mean(axis=(1, 2)))
  split = data.split_subdomains(out, 4)
  assert isinstance(split[1], jax.Array) and split[1].shape == (4, 256)


def test_check_batch_and_split_errors():
  x, y = _batch(10)
  assert data.check_batch((x, y), 5) == 10
  with pytest.raises(ValueError, match="not divisible"):
    data.check_batch((x, y), 3)
  with pytest.raises(ValueError, match="not divisible"):
    data.split_subdomains((x, y), 4)
  with pytest.raises(ValueError, match="disagree"):
    data.split_subdomains((x, y["y"][:8]), 2)
  with pytest.raises(ValueError, match="no array leaves"):
    data.check_batch((), 2)
  with pytest.raises(ValueError, match="no array leaves"):
    data.split_subdomains({"a": None}, 1)
  with pytest.raises(ValueError, match="leading row axis"):
    data.check_batch((x, np.float32(1.0)), 2)
  with pytest.raises(ValueError, match="num_subdomains"):
    data.check_batch((x, y), 0)


@pytest.mark.parametrize("args", [(10, 0, 0.0), (10, 2, -0.1), (10, 2, 1.0), (10, 2, float("nan")),
                                  (10, 2.5, 0.0), (1, 2, 0.0), (0, 1, 0.0), (10, 2, "a")])
def test_layout_errors(args):
  with pytest.raises(ValueError):
    data.overlap_layout(*args)


def test_trim_rows():
  x, y = _batch(10)
  out = data.trim_rows((x, y), 4)
  assert out[0].shape == (8, 3) and out[1]["y"].shape == (8,)
  assert data.trim_rows((x, y), 5)[0] is x
  out = data.trim_rows((jnp.asarray(x),), 3)
  assert isinstance(out[0], jax.Array) and out[0].shape == (9, 3)
  with pytest.raises(ValueError):
    data.trim_rows((x, y), 11)
  with pytest.raises(ValueError):
    data.trim_rows((x, y), 0)


def test_take_rows_errors():
  x, y = _batch(10)
  with pytest.raises(ValueError, match="lie in"):
    data.take_rows((jnp.asarray(x),), np.array([0, 10]))
  with pytest.raises(ValueError, match="1-D integer"):
    data.take_rows((x,), np.array([0.5]))


def _check_epoch(m, size, overlap, batches):
  k = round(overlap * size)
  fresh = size - k
  assert len(batches) == data.num_minibatches(m, size, overlap)
  assert all(b.shape == (size,) and b.dtype == np.int64 for b in batches)
  used = list(batches[0])
  for prev, cur in zip(batches, batches[1:]):
    np.testing.assert_array_equal(cur[:k], prev[size - k:])  # carried rows
    used.extend(cur[k:])
  assert len(used) == len(set(used))  # each row fresh at most once per epoch
  assert 0 <= m - len(used) < fresh  # only a partial minibatch of fresh rows is dropped
  assert all(0 <= r < m for r in used)


def test_minibatches_paper_setting():
  batches = data.minibatches(4000, 660, seed=3, epoch=0)
  assert len(batches) == 6
  assert 4000 - len(set(np.concatenate(batches).tolist())) == 40
  _check_epoch(4000, 660, 0.0, batches)
  batches = data.minibatches(4000, 660, overlap=0.05, seed=3, epoch=0)
  _check_epoch(4000, 660, 0.05, batches)
  assert len(batches) == 6  # 33 carried rows, 627 fresh: 660 + 5 * 627 = 3795 fresh rows


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(m=st.integers(1, 500), size=st.integers(1, 500),
                  overlap=st.floats(0.0, 0.95, allow_nan=False), seed=st.integers(0, 2**32))
def test_minibatches_property(m, size, overlap, seed):
  hypothesis.assume(size <= m and round(overlap * size) < size)
  _check_epoch(m, size, overlap, data.minibatches(m, size, overlap=overlap, seed=seed, epoch=1))


def test_minibatches_deterministic_and_per_epoch():
  a = data.minibatches(1000, 100, overlap=0.1, seed=7, epoch=2)
  b = data.minibatches(1000, 100, overlap=0.1, seed=7, epoch=2)
  for u, v in zip(a, b, strict=True):
    np.testing.assert_array_equal(u, v)
  c = data.minibatches(1000, 100, overlap=0.1, seed=7, epoch=3)
  d = data.minibatches(1000, 100, overlap=0.1, seed=8, epoch=2)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
  order = np.random.default_rng((7, 2)).permutation(1000)
  np.testing.assert_array_equal(a[0], order[:100])  # the documented permutation


def test_iterate_minibatches():
  x, y = _batch(100)
  rows = data.minibatches(100, 30, overlap=0.2, seed=1, epoch=4)
  out = list(data.iterate_minibatches((x, y), 30, overlap=0.2, seed=1, epoch=4))
  assert len(out) == len(rows) == 3
  for batch, index in zip(out, rows):
    np.testing.assert_array_equal(batch[0], x[index])
    np.testing.assert_array_equal(batch[1]["y"], index)
  out = list(data.iterate_minibatches({"x": jnp.asarray(x)}, 30, seed=1))
  assert isinstance(out[0]["x"], jax.Array) and out[0]["x"].shape == (30, 3)


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(batch_size=11), dict(overlap=1.0),
                                    dict(overlap=-0.01), dict(batch_size=2, overlap=0.9),
                                    dict(seed=-1), dict(epoch=-1), dict(epoch=1.5)])
def test_minibatches_errors(kwargs):
  args = dict(batch_size=5, overlap=0.0, seed=0, epoch=0) | kwargs
  size = args.pop("batch_size")
  with pytest.raises(ValueError):
    data.minibatches(10, size, **args)
  with pytest.raises(ValueError):  # raised at the call, before iterating
    data.iterate_minibatches((np.zeros(10),), size, **args)


@pytest.mark.parametrize("rows, n, overlap, dropped, sizes", [
    (661, 4, 0.0, 1, "660 or 664"), (510, 4, 0.0, 2, "508 or 512"),
    (661, 2, 0.05, 1, "660 or 662")])
def test_dropped_rows_are_never_silent(rows, n, overlap, dropped, sizes):
  """A layout that drops rows warns (or raises, or drops quietly when asked); the trainer's
  shard_batch passes the warning on (tests/parallel/test_trainer.py)."""
  batch = (np.arange(rows, dtype=np.float32)[:, None], np.zeros(rows, np.int32))
  expected = f"drops {dropped} of the {rows} rows of the batch; batches of {sizes} rows drop none"
  with pytest.warns(UserWarning, match=expected):
    out = data.overlapping_subdomains(batch, n, overlap)
  assert len(np.unique(out[0])) == rows - dropped
  with pytest.raises(ValueError, match=expected):
    data.overlapping_subdomains(batch, n, overlap, remainder="raise")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.overlapping_subdomains(batch, n, overlap, remainder="drop")
    full = jax.tree.map(lambda a: a[:int(sizes.split()[0])], batch)
    data.overlapping_subdomains(full, n, overlap)  # nothing dropped: no warning
