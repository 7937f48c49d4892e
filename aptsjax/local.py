"""The local iterations of APTS: the ``LocalSolver`` interface, the default TR solver, the loop.

APTS owns the loop over the local iterations (docs/method.md, "Local iterations"); a solver
supplies one iteration for one subdomain. The loop runs on this device's subdomains at once:

    carry_i = solver.start(theta^k, f_i(theta^k), g^k, state_i, bound)
    repeat while trips < nu and some subdomain is active:
      carry, done = vmap(solver.step)(value_and_grad of f_i, carry_i, theta^k, bound, active_i)
      count_i += active_i;  active_i &= ~done_i

The trip condition is one scalar (not vmapped), and a subdomain that has finished is masked
rather than selected: the step keeps its carry as it is (``jnp.where`` on parameter-sized values,
``valid=False`` for the L-SR1 memory, which touches one slot and the small matrices). Nothing
copies the stacked memories, and nothing communicates inside the loop.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aptsjax import _stack
from aptsjax import lsr1
from aptsjax import trust_region as tr

PyTree = Any
ValueAndGrad = Callable[[PyTree], tuple[jax.Array, PyTree]]

LOCAL_STOP = 1e-3  # stop the local iterations once |theta_i - theta^k| >= (1 - LOCAL_STOP) bound.


class LocalCarry(NamedTuple):
  """What one subdomain carries from one local iteration to the next.

  Attributes:
    params: theta_i, the subdomain's current point.
    loss: f_i(theta_i).
    state: the solver's persistent state (what ``init`` made; kept across updates).
    extra: the solver's per-update values (the TR solver: the gradient and the local radius).
  """
  params: PyTree
  loss: jax.Array
  state: PyTree
  extra: PyTree


class LocalSolver(NamedTuple):
  """A pluggable local optimizer for APTS subdomains: one masked iteration at a time.

  Every function works on one subdomain (APTS vmaps them); none may communicate.

  Attributes:
    init: ``params -> state``: the persistent state of one subdomain (APTS stacks N of them).
    start: ``(params, loss, grad, state, bound) -> LocalCarry``: the carry at the start of an
      update, at theta^k = ``params`` where the local objective has ``loss`` and ``grad``
      (= g^k), from the subdomain's ``state``; ``bound`` = Delta^k / N.
    step: ``(value_and_grad, carry, anchor, bound, active) -> (carry, done)``: one iteration on
      the local objective (``value_and_grad``) from ``carry``, keeping |theta_i - anchor| <=
      ``bound`` (``anchor`` = theta^k). ``active`` is a bool scalar: when False the step must
      return ``carry`` unchanged (``jnp.where`` on small and parameter-sized leaves; a large
      state should skip its write rather than select). ``done`` (bool scalar) ends this
      subdomain's iterations; APTS also stops after ``local_steps`` of them.
  """
  init: Callable[[PyTree], PyTree]
  start: Callable[..., LocalCarry]
  step: Callable[..., tuple[LocalCarry, jax.Array]]


def keep_inactive(active: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new`` where ``active``, else ``old``, leaf by leaf (for a step's parameter-sized values)."""
  return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)


def distance(params: PyTree, anchor: PyTree) -> jax.Array:
  """|params - anchor|, the length of a subdomain's step so far."""
  return _stack.norm(optax.tree.sub(params, anchor))


def trust_region_local_solver(hp: tr.Hyperparams, second_order: bool, memory: int) -> LocalSolver:
  """The library's TR as the local solver (docs/method.md, "Local iterations").

  Each step is ``aptsjax.trust_region.iterate`` with the radius min(local radius,
  bound - |theta_i - theta^k|); it reports ``done`` once |theta_i - theta^k| >=
  (1 - 1e-3) bound. The local radius starts at ``bound`` every update.

  Args:
    hp: the local constants (radii already divided by N).
    second_order: L-SR1 + OBS (True) or the first-order model.
    memory: L-SR1 pairs per subdomain.

  Returns:
    A ``LocalSolver`` whose state is the subdomain's L-SR1 memory (None for first order) and
    whose ``extra`` is (gradient, local radius).
  """
  def init(params):
    return lsr1.init(params, memory) if second_order else None

  def start(params, loss, grad, state, bound):
    return LocalCarry(params=params, loss=loss, state=state, extra=(grad, bound))

  def step(value_and_grad, carry, anchor, bound, active):
    grad, radius = carry.extra
    out = tr.iterate(value_and_grad, carry.params, carry.loss, grad, radius, carry.state, hp,
                     step_cap=bound - distance(carry.params, anchor), store_pair=active)
    params, loss, grad, radius = keep_inactive(
        active, (out.params, out.loss, out.grad, out.radius), (carry.params, carry.loss, grad, radius))
    done = distance(params, anchor) >= (1.0 - LOCAL_STOP) * bound
    return LocalCarry(params=params, loss=loss, state=out.memory, extra=(grad, radius)), done

  return LocalSolver(init=init, start=start, step=step)


class LocalOutcome(NamedTuple):
  """The result of the local iterations, leaves with a leading subdomain axis.

  Attributes:
    params: theta_i of every subdomain.
    loss: f_i(theta_i).
    state: the solvers' persistent states after the update.
    num_steps: the iterations each subdomain took.
  """
  params: PyTree
  loss: jax.Array
  state: PyTree
  num_steps: jax.Array


def run(solver: LocalSolver, local_value_and_grad: Callable[[Any, PyTree], Any], inputs: PyTree,
        anchor: PyTree, losses: jax.Array, grad: PyTree, states: PyTree, bound: jax.Array,
        num_steps: int) -> LocalOutcome:
  """The local iterations of this device's subdomains: one loop, vmapped masked steps.

  Args:
    solver: the ``LocalSolver``.
    local_value_and_grad: ``(input_i, params) -> (f_i, grad f_i)``, the local objective of the
      subdomain with ``input_i`` (a slice of ``inputs``).
    inputs: per-subdomain data of the local objectives, leaves with a leading subdomain axis.
    anchor: theta^k.
    losses: ``(n,)`` f_i(theta^k).
    grad: g^k, the gradient of every f_i at theta^k.
    states: the solvers' persistent states, leaves with a leading subdomain axis.
    bound: Delta^k / N; not positive: no iterations.
    num_steps: nu, the most iterations per subdomain.

  Returns:
    A ``LocalOutcome``.
  """
  start = jax.vmap(lambda f, s: solver.start(anchor, f, grad, s, bound))(losses, states)

  def one(inp, carry, active):
    value_and_grad = lambda p: local_value_and_grad(inp, p)
    return solver.step(value_and_grad, carry, anchor, bound, active)

  def cond(c):
    trips, _, _, active = c
    return (trips < num_steps) & jnp.any(active)

  def body(c):
    trips, carry, count, active = c
    carry, done = jax.vmap(one)(inputs, carry, active)
    return trips + 1, carry, count + active.astype(jnp.int32), active & ~done

  active = jnp.broadcast_to(bound > 0, losses.shape)
  init = _stack.match_varying(
      (jnp.zeros((), jnp.int32), start, jnp.zeros(losses.shape, jnp.int32), active), losses)
  _, carry, count, _ = jax.lax.while_loop(cond, body, init)
  return LocalOutcome(params=carry.params, loss=carry.loss, state=carry.state, num_steps=count)
