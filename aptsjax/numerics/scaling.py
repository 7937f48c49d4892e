"""The scaled trust region |D s|_2 <= Delta, with D diagonal from an RMS of past gradients.

``TrustRegionConfig(norm="rms")`` (docs/method.md, "Scaled trust region"). D is kept as Adam
keeps its second moment: v <- rho v + (1 - rho) g * g, bias-corrected by 1 - rho^t, and

  D^2 = w / mean(w),   w = sqrt(v_hat) + eps,

normalised so that the mean of D^2 over the parameters is 1 (a radius keeps the scale it has in
the Euclidean norm: |D s| = |s| for a step spread evenly over the coordinates).

The region is solved exactly by a change of variables u = D theta: the objective
f^(u) = f(D^{-1} u) has gradient D^{-1} g and, for an L-SR1 model, pairs (D s, D^{-1} y), and the
region becomes |u - u^k|_2 <= Delta. Every trust-region piece (OBS, the first-order step, the
ratio test, APTS's local and global phases and its bound |s~|_D <= Delta) then runs unchanged in
u. The first-order step is s = -Delta D^{-2} g / |D^{-1} g|, the steepest descent direction of
the D-norm (D^{-2} g is Adam's g / sqrt(v_hat) up to eps and the normalisation).

D changes once per update, from the gradient at the current point; an L-SR1 memory, kept in the
variables of the previous D, is moved to the new ones by ``lsr1.rescale`` with ratio
D_new / D_old, so its pairs stay consistent with the variables the model is solved in.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


PyTree = Any


class ScaleState(NamedTuple):
  """The diagonal scaling D (a pytree: save and restore it with the optimizer state).

  Attributes:
    nu: the running average of g * g, like the parameters (at least float32).
    count: int32, the number of gradients averaged (for the bias correction).
    d: D, like the parameters; ones before the first gradient.
  """
  nu: PyTree
  count: jax.Array
  d: PyTree


def init(params: PyTree) -> ScaleState:
  """D = I and an empty average, for parameters shaped like ``params``."""
  wide = lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.asarray(p).dtype, jnp.float32))
  return ScaleState(nu=jax.tree.map(wide, params), count=jnp.zeros((), jnp.int32),
                    d=jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.asarray(p).dtype), params))


def update(state: ScaleState, grad: PyTree, decay: float, eps: float,
           valid: jax.Array | bool = True) -> ScaleState:
  """Adds ``grad`` to the average and returns the new D (unchanged when ``valid`` is False).

  Args:
    state: a ``ScaleState``.
    grad: the gradient at the current point, like the parameters.
    decay: rho, the average's decay (``TrustRegionConfig.rms_decay``).
    eps: added to the RMS before normalising (``TrustRegionConfig.rms_eps``).
    valid: False keeps the state (a non-finite gradient).

  Returns:
    The new ``ScaleState``.
  """
  count = state.count + 1
  nu = jax.tree.map(lambda v, g: decay * v + (1.0 - decay) * jnp.square(g.astype(v.dtype)),
                    state.nu, grad)
  w = jax.tree.map(lambda v: jnp.sqrt(v / (1.0 - decay ** count.astype(v.dtype))) + eps, nu)
  size = sum(x.size for x in jax.tree.leaves(w))
  mean = sum(jnp.sum(x) for x in jax.tree.leaves(w)) / size
  ok = jnp.asarray(valid) & jnp.isfinite(mean) & (mean > 0)
  d = jax.tree.map(lambda x, old: jnp.where(ok, jnp.sqrt(x / jnp.where(ok, mean, 1.0)),
                                            old).astype(old.dtype), w, state.d)
  keep = lambda new, old: optax.tree.where(ok, new, old)
  return ScaleState(nu=keep(nu, state.nu), count=jnp.where(ok, count, state.count), d=d)


class Coordinates(NamedTuple):
  """The change of variables u = D theta (identity when ``d`` is None: the Euclidean region).

  Points and steps map with ``to_u`` / ``to_theta``; gradients the other way round
  (``grad_to_u`` / ``grad_to_theta``), so that inner products g.s are the same in both.
  """
  d: PyTree | None = None

  def to_u(self, x: PyTree) -> PyTree:
    """A point or step in u: D x."""
    return x if self.d is None else jax.tree.map(lambda a, b: a * b.astype(a.dtype), x, self.d)

  def to_theta(self, x: PyTree) -> PyTree:
    """A point or step back in theta: D^{-1} x."""
    return x if self.d is None else jax.tree.map(lambda a, b: a / b.astype(a.dtype), x, self.d)

  def grad_to_u(self, g: PyTree) -> PyTree:
    """A gradient in u: D^{-1} g."""
    return self.to_theta(g)

  def grad_to_theta(self, g: PyTree) -> PyTree:
    """A gradient back in theta: D g."""
    return self.to_u(g)

  def value_and_grad(self, fn: Callable[[PyTree], tuple[jax.Array, PyTree]]
                     ) -> Callable[[PyTree], tuple[jax.Array, PyTree]]:
    """``u -> (f(D^{-1} u), D^{-1} grad f(D^{-1} u))`` from ``fn = theta -> (f, grad f)``."""
    if self.d is None:
      return fn

    def in_u(u):
      value, grad = fn(self.to_theta(u))
      return value, self.grad_to_u(grad)
    return in_u


def coordinates(state: ScaleState | None) -> Coordinates:
  """The ``Coordinates`` of a scaling state (the identity for None)."""
  return Coordinates(None if state is None else state.d)


def ratio(old: ScaleState, new: ScaleState) -> PyTree:
  """D_new / D_old, the factor that moves an L-SR1 memory to the new variables."""
  return jax.tree.map(lambda a, b: a / b, new.d, old.d)

