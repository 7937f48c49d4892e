"""Records float64 trajectories of explicit configurations.

    python -m tests.golden.record [PATH]

writes PATH (default: tests/golden/trajectories.npz, the trajectories recorded on main 59704ee,
before the package was split into layers). ``tests/optim/test_golden.py`` runs this script on
today's API (in a subprocess, beside the in-process tests) and asserts the trajectories are
bitwise equal to the recorded ones. The XLA flags are the test suite's (tests/conftest.py), since
bitwise equality is only promised under fixed flags: run as a script, it adds those the
environment lacks and enables float64; imported, it changes no setting.
"""
import os
import sys

FLAGS = ("--xla_force_host_platform_device_count=4", "--xla_cpu_use_fusion_emitters=false",
         "--xla_backend_optimization_level=0")

if __name__ == "__main__":
  _flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join([_flags, *(f for f in FLAGS if f not in _flags)]).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ITERATIONS = 6


def problem():
  """A 6-8-3 tanh MLP on 48 rows of fixed data (float64)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 6))
  y = rng.integers(0, 3, size=48)
  params = {"w1": rng.normal(size=(6, 8)) * 0.5, "b1": np.zeros(8),
            "w2": rng.normal(size=(8, 3)) * 0.5, "b2": np.zeros(3)}
  params = jax.tree.map(jnp.asarray, params)

  def loss_fn(p, batch):
    xb, yb = batch
    h = jnp.tanh(xb @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  return params, loss_fn, (jnp.asarray(x), jnp.asarray(y))


def batches(data, minibatch, nan_at=None):
  """The batch of each iteration: the whole data, or successive 24-row minibatches; with
  ``nan_at`` that iteration's batch holds a NaN (the update is skipped)."""
  x, y = data
  if nan_at is not None:
    out = [data] * ITERATIONS
    out[nan_at] = (x.at[0, 0].set(jnp.nan), y)
    return out
  if not minibatch:
    return [data] * ITERATIONS
  return [(x[(i % 2) * 24:(i % 2 + 1) * 24], y[(i % 2) * 24:(i % 2 + 1) * 24])
          for i in range(ITERATIONS)]


def run(tx, params, loss_fn, data, minibatch=False, needs_grad=True, nan_at=None):
  """Jitted updates; returns params (flat), value, radius, accepted per iteration."""
  state = tx.init(params)

  @jax.jit
  def step(p, s, batch):
    grads = jax.grad(loss_fn)(p, batch) if needs_grad else None
    updates, s = tx.update(grads, s, p, batch=batch)
    return jax.tree.map(lambda a, b: a + b, p, updates), s

  rows = []
  for batch in batches(data, minibatch, nan_at):
    params, state = step(params, state, batch)
    value = state.value if hasattr(state, "value") else state.loss
    rows.append((np.concatenate([np.ravel(l) for l in jax.tree.leaves(params)]),
                 float(value), float(state.radius), bool(state.accepted)))
  return {"params": np.stack([r[0] for r in rows]), "value": np.array([r[1] for r in rows]),
          "radius": np.array([r[2] for r in rows]), "accepted": np.array([r[3] for r in rows])}


def run_trainer(trainer, params, data):
  params = jax.tree.map(jnp.copy, params)  # the step donates what it is given
  state = trainer.init(params)
  batch = trainer.shard_batch(data)
  rows = []
  for _ in range(ITERATIONS):
    params, state = trainer.step(params, state, batch)
    value = state.value if hasattr(state, "value") else state.loss
    rows.append((np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(params)]),
                 float(value), float(state.radius), bool(state.accepted)))
  return {"params": np.stack([r[0] for r in rows]), "value": np.array([r[1] for r in rows]),
          "radius": np.array([r[2] for r in rows]), "accepted": np.array([r[3] for r in rows])}


# The explicit configurations (the API of main 59704ee).
TR_DEFAULTS = dict(init_radius=0.01, min_radius=1e-10, max_radius=4.0, eta_accept=0.0, eta1=0.25,
                   eta2=0.75, alpha=0.5, beta=2.0, radius_growth="boundary", norm="l2")
TR_PAPER = dict(TR_DEFAULTS, min_radius=1e-3, radius_growth="always")
APTS_DEFAULTS = dict(init_radius=0.01, min_radius=1e-3, max_radius=4.0, eta_accept=0.0, eta1=0.25,
                     eta2=0.75, alpha=0.5, beta=2.0, radius_growth="always", norm="l2",
                     local_radius="bound", combine="mean", local_solver="adam", local_lr=1e-3,
                     radius_units="absolute")
APTS_PAPER = dict(APTS_DEFAULTS, combine="sum", local_solver="trust_region")


def record():
  import aptsjax
  params, loss_fn, data = problem()
  out = {}

  def add(name, traj):
    for key, value in traj.items():
      out[f"{name}/{key}"] = value

  for order in (1, 2):
    so = order == 2
    for preset, hp in (("defaults", TR_DEFAULTS), ("paper", TR_PAPER)):
      add(f"tr/{preset}/o{order}", run(aptsjax.trust_region(loss_fn, memory=5, second_order=so, **hp),
                                       params, loss_fn, data))
    add(f"tr/rms/o{order}", run(aptsjax.trust_region(loss_fn, memory=5, second_order=so,
                                                     **dict(TR_DEFAULTS, norm="rms")), params, loss_fn, data))
    for preset, hp in (("defaults", APTS_DEFAULTS), ("paper", APTS_PAPER)):
      kw = dict(num_subdomains=2, local_steps=3, second_order=so, memory=5, global_steps=1)
      add(f"apts/{preset}/o{order}", run(aptsjax.apts(loss_fn, **kw, **hp), params, loss_fn, data))
      add(f"sapts/{preset}/o{order}", run(aptsjax.apts(loss_fn, **kw, **hp), params, loss_fn, data,
                                          minibatch=True, needs_grad=False))
    kw = dict(num_subdomains=4, local_steps=2, second_order=so, memory=4, global_steps=2)
    add(f"apts/rms_split_boundary/o{order}",
        run(aptsjax.apts(loss_fn, **kw, **dict(APTS_PAPER, norm="rms", local_radius="split",
                                               radius_growth="boundary")), params, loss_fn, data))
    add(f"apts/layers/o{order}",
        run(aptsjax.apts(loss_fn, num_subdomains=2, local_steps=3, second_order=so, memory=5,
                         param_blocks="layers", **APTS_PAPER), params, loss_fn, data))
    add(f"apts/global0/o{order}",
        run(aptsjax.apts(loss_fn, num_subdomains=2, local_steps=3, second_order=so, memory=5,
                         global_steps=0, **APTS_DEFAULTS), params, loss_fn, data))
    add(f"tr/large_radius_nan/o{order}",
        run(aptsjax.trust_region(loss_fn, memory=5, second_order=so, **dict(TR_PAPER, init_radius=3.0)),
            params, loss_fn, data, nan_at=2))
    for preset, hp in (("defaults", APTS_DEFAULTS), ("paper", APTS_PAPER)):
      add(f"apts/large_radius_nan/{preset}/o{order}",
          run(aptsjax.apts(loss_fn, num_subdomains=2, local_steps=3, second_order=so, memory=5,
                           **dict(hp, init_radius=3.0, max_radius=8.0)), params, loss_fn, data,
              nan_at=2, needs_grad=False))
    for preset, hp in (("defaults", APTS_DEFAULTS), ("paper", APTS_PAPER)):
      trainer = aptsjax.parallel.apts_trainer(loss_fn, 4, num_devices=2, local_steps=3,
                                              second_order=so, memory=5, **hp)
      add(f"trainer/{preset}/o{order}", run_trainer(trainer, params, data))
  return out


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", True)
  path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__),
                                                            "trajectories.npz")
  result = record()
  np.savez_compressed(path, **result)
  print(f"wrote {len(result)} arrays to {path}")
