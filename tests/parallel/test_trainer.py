"""Guards: every misuse gets a clear error or a visible, documented outcome (no silent failure).

One test per case: a missing or empty batch, half-precision and non-floating parameters,
non-integer sizes, float32 parameters with float64 data, a non-finite loss in the trainer, a
rescaling chain, and batches whose subdomain layout drops rows.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import aptsjax
from aptsjax import data
from aptsjax import parallel
from aptsjax.flax import nnx_loss_fn


def lsq_loss(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def lsq_problem(rows=64, dtype=np.float32, scale=1.0, seed=0):
  """Least squares in 5 unknowns; ``scale`` multiplies the features and divides the solution."""
  rng = np.random.default_rng(seed)
  x = scale * rng.normal(size=(rows, 5))
  y = x @ (np.linspace(1.0, 5.0, 5) / scale) + 1.0
  params = {"w": jnp.zeros(5, dtype), "b": jnp.zeros((), dtype)}
  return params, (jnp.asarray(x, dtype), jnp.asarray(y, dtype))


def run(tx, params, batch, steps):
  """``steps`` updates (gradients at the current point); returns params, state and the losses."""
  state = tx.init(params)
  losses = [float(lsq_loss(params, batch))]
  for _ in range(steps):
    grads = jax.grad(lsq_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    params = optax.apply_updates(params, updates)
    losses.append(float(lsq_loss(params, batch)))
  return params, state, losses


# 1. A missing, empty or too small batch.
def test_missing_or_empty_batch_is_a_clear_value_error():
  params, batch = lsq_problem()
  grads = jax.grad(lsq_loss)(params, batch)
  tx = aptsjax.trust_region(lsq_loss)
  with pytest.raises(ValueError, match=r"without batch=.*loss_fn\(params, None\) failed") as info:
    tx.update(grads, tx.init(params), params)
  assert "tx.update(grads, state, params, batch=batch)" in str(info.value)
  assert "optimizer.update(model, grads, batch=batch)" in str(info.value)
  assert isinstance(info.value.__cause__, TypeError)  # the user's own error, chained
  # A loss without data still runs with batch=None.
  quad = aptsjax.trust_region(lambda p, _: jnp.sum(p ** 2))
  x = jnp.ones(3)
  updates, _ = quad.update(2.0 * x, quad.init(x), x)
  assert float(jnp.sum((x + updates) ** 2)) < 3.0
  empty = jax.tree.map(lambda a: a[:0], batch)
  with pytest.raises(ValueError, match="0 rows"):
    tx.update(grads, tx.init(params), params, batch=empty)

  apts = aptsjax.apts(lsq_loss, num_subdomains=4, second_order=False)
  state = apts.init(params)
  with pytest.raises(ValueError, match="apts needs the batch"):
    apts.update(None, state, params)
  for rows in (0, 3):
    small = jax.tree.map(lambda a, k=rows: a[:k], batch)
    with pytest.raises(ValueError, match=f"has {rows} rows, fewer than its 4 subdomains"):
      apts.update(None, state, params, batch=small)


# 2. Half-precision and non-floating parameters.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method", ["trust_region", "apts"])
def test_half_precision_first_order_trains_and_second_order_is_refused(dtype, method):
  # Features of size 20: the loss starts near 60 but the squared gradient norm near 4e5
  # overflows float16 (max 65504) unless the norm accumulates in float32.
  params, batch = lsq_problem(dtype=dtype, scale=20.0)
  make = (aptsjax.trust_region if method == "trust_region" else
          lambda f, **kw: aptsjax.apts(f, num_subdomains=2, local_steps=2, **kw))
  params, state, losses = run(make(lsq_loss, second_order=False), params, batch, 8)
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
  assert state.value.dtype == dtype
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses

  with pytest.raises(ValueError, match=r"float32 or float64.*second_order=False.*float32"):
    make(lsq_loss, second_order=True).init(params)
  int_params = {"w": jnp.zeros(5, jnp.int32), "b": jnp.zeros((), jnp.int32)}
  with pytest.raises(ValueError, match="floating arrays, got leaves of dtype int32"):
    make(lsq_loss, second_order=False).init(int_params)


# 3. Non-integer sizes, checked before any device is queried.
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
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 2.5"):
      aptsjax.apts(lsq_loss, **{name: 2.5})
  with pytest.raises(ValueError, match="memory must be an integer >= 1, got 2.5"):
    aptsjax.trust_region(lsq_loss, memory=2.5, second_order=False)
  # numpy integers are integers.
  tx = aptsjax.apts(lsq_loss, num_subdomains=np.int64(2), local_steps=np.int32(2))
  assert tx.init(lsq_problem()[0]).local_steps.shape == (2,)


# 4. float32 parameters with float64 data under jax_enable_x64.
@pytest.mark.parametrize("second_order", [False, True])
def test_float32_params_with_float64_data(x64, second_order):
  params, batch = lsq_problem(dtype=np.float32)
  batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), batch)
  for tx in (aptsjax.trust_region(lsq_loss, second_order=second_order),
             aptsjax.apts(lsq_loss, num_subdomains=2, local_steps=2, second_order=second_order)):
    state = tx.init(params)
    step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(lsq_loss)(p, batch), s, p, batch=batch))
    p = params
    for _ in range(3):
      updates, state = step(p, state)
      p = optax.apply_updates(p, updates)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((p, state.grad)))
    assert state.value.dtype == jnp.float32 and state.radius.dtype == jnp.float32
    assert float(state.value) < float(lsq_loss(params, batch))

  # A Flax NNX model through aptsjax.flax_utils and nnx.Optimizer, with either method.
  model_loss = lambda m, b: jnp.mean((m(b[0])[:, 0] - b[1]) ** 2)

  @nnx.jit
  def nnx_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(model_loss)(model, batch)
    optimizer.update(model, grads, batch=batch)
    return loss

  for make in (aptsjax.trust_region,
               lambda f, **kw: aptsjax.apts(f, num_subdomains=2, local_steps=2, **kw)):
    model = nnx.Linear(5, 1, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    tx = make(nnx_loss_fn(model, model_loss), second_order=second_order)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    losses = [float(nnx_step(model, optimizer, batch)) for _ in range(4)]
    assert model.kernel[...].dtype == jnp.float32
    assert optimizer.opt_state.value[...].dtype == jnp.float32
    assert float(optimizer.opt_state.value[...]) < losses[0], losses


# 5. A non-finite loss at the current point in the trainer.
@pytest.mark.parametrize("num_devices", [1, 2])
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


# 6. A rescaling chain is documented, not detected: the documented consequence.
def test_rescaling_chain_consequence_is_documented():
  for doc in (aptsjax.trust_region.__doc__, aptsjax.apts.__doc__):
    assert "optax.chain(tx,\n  optax.scale(c))" in doc or "optax.chain(tx, optax.scale(c))" in doc
    assert "not detected" in doc
  params, batch = lsq_problem()
  gaps = {}
  for name, tx in (("alone", aptsjax.trust_region(lsq_loss, second_order=False)),
                   ("scaled", optax.chain(aptsjax.trust_region(lsq_loss, second_order=False),
                                          optax.scale(0.5)))):
    state = tx.init(params)
    grads = jax.grad(lsq_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    tr_state = state if name == "alone" else state[0]
    assert bool(tr_state.accepted)
    new_params = optax.apply_updates(params, updates)
    gaps[name] = abs(float(tr_state.value) - float(lsq_loss(new_params, batch)))
    gaps[name] /= float(lsq_loss(new_params, batch))
  assert gaps["alone"] < 1e-6, gaps   # state.value is the loss at the new parameters ...
  assert gaps["scaled"] > 1e-3, gaps  # ... but not after optax.scale(0.5) halved the step.


# 7. A layout that drops rows warns (or raises, or drops quietly when asked).
@pytest.mark.parametrize("rows, n, overlap, dropped, sizes", [
    (661, 4, 0.0, 1, "660 or 664"), (510, 4, 0.0, 2, "508 or 512"),
    (661, 2, 0.05, 1, "660 or 662")])
def test_dropped_rows_are_never_silent(rows, n, overlap, dropped, sizes):
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
  for num_devices in (1, n):
    trainer = parallel.apts_trainer(lsq_loss, n, num_devices=num_devices, overlap=overlap)
    with pytest.warns(UserWarning, match=expected):
      trainer.shard_batch(batch)
