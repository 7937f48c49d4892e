"""Test problems and pytree helpers shared by the test layers (numerics, optim, parallel).

* ``mlp_loss`` / ``problem``: a 4-8-1 tanh MLP regression (the APTS tests' problem).
* ``quadratic`` / ``rosenbrock``: a fixed convex quadratic in R^4 and extended Rosenbrock on a
  two-leaf dict (the trust-region tests' problems; ``batch`` unused).
* ``lsq_loss`` / ``lsq_problem``: least squares in 5 unknowns (the guards' problem).
* ``apts_updates`` / ``train``: jitted full-batch updates, recorded.
* ``flat`` / ``leaves_like`` / ``assert_close``: pytrees as float64 vectors and back, and a
  leaf-wise closeness check.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from tests.rounding import flat  # re-exported: a pytree as one float64 vector  # noqa: F401


def mlp_loss(params, batch):
  """Mean squared error of a tanh MLP on ``batch = (x, y)``."""
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  out = h @ params["w2"] + params["b2"]
  return jnp.mean((out[:, 0] - y) ** 2)


def problem(dtype=jnp.float32, rows=64, seed=0):
  """``(params, (x, y))`` of ``mlp_loss``: 4 inputs, 8 hidden units, ``rows`` rows."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"w1": 0.5 * jax.random.normal(k1, (4, 8), dtype), "b1": jnp.zeros(8, dtype),
            "w2": 0.5 * jax.random.normal(k2, (8, 1), dtype), "b2": jnp.zeros(1, dtype)}
  x = jax.random.normal(k3, (rows, 4), dtype)
  y = jnp.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
  return params, (x, y)


# A fixed convex quadratic f(x) = 0.5 x.Ax - b.x in R^4 (A symmetric positive definite).
A = np.array([[4.0, 1.0, 0.0, 0.0], [1.0, 3.0, 0.5, 0.0], [0.0, 0.5, 2.0, 0.2],
              [0.0, 0.0, 0.2, 1.0]])
B = np.array([1.0, -2.0, 0.5, 3.0])
X0 = np.array([2.0, -1.0, 1.5, 0.5])


def quadratic(x, batch=None):
  """f(x) = 0.5 x.Ax - b.x (batch unused)."""
  del batch
  a = jnp.asarray(A, x.dtype)
  return 0.5 * x @ (a @ x) - jnp.asarray(B, x.dtype) @ x


def rosenbrock(params, batch=None):
  """Extended Rosenbrock on a dict {'u': odd coordinates, 'v': even coordinates}."""
  del batch
  u, v = params["u"], params["v"]
  return jnp.sum(100.0 * (v - u**2) ** 2 + (1.0 - u) ** 2)


def leaves_like(template, vector):
  """``vector`` (flat, ravel order) as a pytree like ``template``."""
  return ravel_pytree(template)[1](jnp.asarray(vector))


def assert_close(a, b, rtol):
  """Leaf-wise ``assert_allclose`` with an absolute tolerance scaled by the reference's size."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(1.0, float(np.abs(y).max())))


def lsq_loss(params, batch):
  """Least squares ``mean((x w + b - y)^2)`` (the guards' problem)."""
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def lsq_problem(rows=64, dtype=np.float32, scale=1.0, seed=0):
  """Least squares in 5 unknowns; ``scale`` multiplies the features and divides the solution."""
  rng = np.random.default_rng(seed)
  x = scale * rng.normal(size=(rows, 5))
  y = x @ (np.linspace(1.0, 5.0, 5) / scale) + 1.0
  params = {"w": jnp.zeros(5, dtype), "b": jnp.zeros((), dtype)}
  return params, (jnp.asarray(x, dtype), jnp.asarray(y, dtype))


def apts_updates(tx, params, batch, iters: int):
  """``iters`` jitted full-batch APTS updates (``grads=None``); returns the list of (radius
  before the update, updates, state after it)."""
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  state, out = tx.init(params), []
  for _ in range(iters):
    radius = float(state.radius)
    updates, state = step(params, state)
    out.append((radius, updates, state))
    params = optax.apply_updates(params, updates)
  return out


class Trained(NamedTuple):
  """What ``train`` returns: the final parameters, state and updates; the losses at the start
  and after each update; ``state.value`` after each update."""
  params: Any
  state: Any
  updates: Any
  losses: list[float]
  values: list[float]


def train(tx, loss_fn, params, batch, steps: int) -> Trained:
  """``steps`` jitted updates with the gradient at the current point and ``batch=``."""
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p, batch), s, p, batch=batch))
  losses, values = [float(loss_fn(params, batch))], []
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss_fn(params, batch)))
    values.append(float(state.value))
  return Trained(params, state, updates, losses, values)
