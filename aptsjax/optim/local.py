"""The local iterations of APTS: the ``LocalSolver`` interface and the loop.

APTS owns the loop over the local iterations (docs/method.md, "Local iterations"); a solver
supplies one iteration of one subdomain (``step``) and says when that subdomain is done. Each
subdomain runs at most nu iterations from ``start``; nothing communicates. ``run`` has two
shapes of the loop over a device's subdomains, with the same results:

* sequential (the default on CPU): one subdomain after the other, each with its own
  ``while_loop`` that stops when it is done; its L-SR1 memory is updated in place in the stack.
* vectorized (the default on other backends): one loop whose trip condition is one scalar,
  ``trips < nu and any(active)``, each trip ``jax.vmap(step)`` over the subdomains with a
  per-subdomain ``active`` flag. A finished subdomain is masked, not selected: its step keeps its
  carry (``jnp.where`` on parameter-sized values; ``valid=False`` for the L-SR1 memory, which
  touches one slot and the small matrices), so the stacked memories are never copied per trip.

Neither runs an n-sized computation under a vmapped ``while_loop`` or ``cond`` (where every
subdomain would pay for the one that still needs it). On CPU the sequential shape is the faster
(docs/method.md, "Local iterations"); batching the subdomains pays where wide kernels are cheap.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aptsjax.numerics import tree as _stack

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

  Every function works on one subdomain (``run`` applies it to each); none may communicate.

  Attributes:
    init: ``params -> state``: the persistent state of one subdomain (APTS stacks N of them).
    start: ``(params, loss, grad, state, bound) -> LocalCarry``: the carry at the start of an
      update, at theta^k = ``params`` where the local objective has ``loss`` and ``grad``
      (= g^k), from the subdomain's ``state``; ``bound`` = Delta^k / N.
    step: ``(value_and_grad, carry, anchor, bound, active) -> (carry, done)``: one iteration on
      the local objective (``value_and_grad``) from ``carry``, keeping |theta_i - anchor| <=
      ``bound`` (``anchor`` = theta^k). ``active`` is a bool scalar, always True in the
      sequential loop; the vectorized loop passes False for a subdomain that has finished, and
      the step must then return ``carry`` unchanged (``keep_inactive`` on small and
      parameter-sized leaves; a large state should skip its write rather than select).
      ``done`` (bool scalar) ends this subdomain's iterations; APTS also stops after
      ``local_steps`` of them.
    rescale: optional ``(state, ratio) -> state``: moves a subdomain's state to new variables
      u' = ratio * u when the scaled trust region (``norm="rms"``) changes D; with ``norm="rms"``
      APTS runs the local iterations in u = D theta (``aptsjax.scaling``). None keeps the
      state as it is.
    refresh: optional ``(carry, loss, grad) -> carry``: the carry with the local objective's
      value and gradient at ``carry.params`` replaced, when the next iteration reads another
      minibatch (a ``Stream``, ``aptsjax.optim.local_stream``). None: the solver cannot read
      streams.
  """
  init: Callable[[PyTree], PyTree]
  start: Callable[..., LocalCarry]
  step: Callable[..., tuple[LocalCarry, jax.Array]]
  rescale: Callable[[PyTree, PyTree], PyTree] | None = None
  refresh: Callable[[LocalCarry, jax.Array, PyTree], LocalCarry] | None = None


def keep_inactive(active: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new`` where ``active``, else ``old``, leaf by leaf (for a step's parameter-sized values)."""
  return optax.tree.where(active, new, old)


def distance(params: PyTree, anchor: PyTree) -> jax.Array:
  """|params - anchor|, the length of a subdomain's step so far."""
  return _stack.norm(optax.tree.sub(params, anchor))


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
        num_steps: int, vectorize: bool | None = None,
        project: Callable[[Any, PyTree], PyTree] | None = None,
        shared_grad: bool = True) -> LocalOutcome:
  """The local iterations of this device's subdomains (see the module docstring).

  Args:
    solver: the ``LocalSolver``.
    local_value_and_grad: ``(input_i, params) -> (f_i, grad f_i)``, the local objective of the
      subdomain with ``input_i`` (a slice of ``inputs``); for a streamed solver
      (``aptsjax.optim.local_stream``) ``(input_i, h, params)``, on minibatch h.
    inputs: per-subdomain data of the local objectives, leaves with a leading subdomain axis.
    anchor: theta^k.
    losses: ``(n,)`` f_i(theta^k).
    grad: g^k, the gradient of every f_i at theta^k; with ``shared_grad=False`` each f_i's
      own gradient there (leaves with a leading subdomain axis).
    states: the solvers' persistent states, leaves with a leading subdomain axis.
    bound: Delta^k / N, a scalar, or one per subdomain ``(n,)`` (APTS's parameter blocks);
      not positive: no iterations.
    num_steps: nu, the most iterations per subdomain.
    vectorize: the vectorized (True) or sequential (False) loop; None: sequential on CPU,
      vectorized elsewhere.
    project: optional ``(input_i, gradient) -> gradient``: what subdomain i sees of every
      gradient, the start gradient ``grad`` included (APTS's parameter blocks: the gradient
      masked to the block, ``aptsjax.blocks.mask``). None: the gradients as they are.
    shared_grad: whether ``grad`` is one gradient for every subdomain (the first-order
      consistency term makes it g^k) or one per subdomain.

  Returns:
    A ``LocalOutcome``.
  """
  if vectorize is None:
    vectorize = jax.default_backend() != "cpu"
  if project is None:
    start_grad, value_and_grad = lambda inp, g: g, local_value_and_grad
  else:
    start_grad = project

    def value_and_grad(inp, *point):
      value, g = local_value_and_grad(inp, *point)
      return value, project(inp, g)
  # Each subdomain's bound (and its own start gradient) travels with its inputs:
  # (input_i, bound_i, grad_i or None).
  inputs = (inputs, jnp.broadcast_to(jnp.asarray(bound), losses.shape),
            None if shared_grad else grad)
  one_step = lambda inp, carry, active: solver.step(
      functools.partial(value_and_grad, inp[0]), carry, anchor, inp[1], active)
  loop = _vectorized if vectorize else _sequential
  return loop(solver, one_step,
              lambda inp: start_grad(inp[0], grad if shared_grad else inp[2]),
              inputs, anchor, losses, states, num_steps)


StepFn = Callable[[Any, LocalCarry, jax.Array], tuple[LocalCarry, jax.Array]]
StartGrad = Callable[[Any], PyTree]


def _vectorized(solver: LocalSolver, one_step: StepFn, start_grad: StartGrad,
                inputs: PyTree, anchor: PyTree, losses: jax.Array, states: PyTree,
                num_steps: int) -> LocalOutcome:
  """One loop for all subdomains: vmapped masked steps, one scalar trip condition.

  ``inputs`` holds each subdomain's input with its bound (see ``run``).
  """
  start = jax.vmap(lambda inp, f, s: solver.start(anchor, f, start_grad(inp), s, inp[1]))(
      inputs, losses, states)

  def cond(c):
    trips, _, _, active = c
    return (trips < num_steps) & jnp.any(active)

  def body(c):
    trips, carry, count, active = c
    carry, done = jax.vmap(one_step)(inputs, carry, active)
    return trips + 1, carry, count + active.astype(jnp.int32), active & ~done

  active = inputs[1] > 0
  init = _stack.match_varying(
      (jnp.zeros((), jnp.int32), start, jnp.zeros(losses.shape, jnp.int32), active), losses)
  _, carry, count, _ = jax.lax.while_loop(cond, body, init)
  return LocalOutcome(params=carry.params, loss=carry.loss, state=carry.state, num_steps=count)


def _sequential(solver: LocalSolver, one_step: StepFn, start_grad: StartGrad,
                inputs: PyTree, anchor: PyTree, losses: jax.Array, states: PyTree,
                num_steps: int) -> LocalOutcome:
  """One subdomain after the other, each with its own while_loop; states updated in place.

  ``inputs`` holds each subdomain's input with its bound (see ``run``).
  """
  take = lambda tree, i: jax.tree.map(lambda x: x[i], tree)

  def subdomain(i, out):
    bound = inputs[1][i]
    carry = solver.start(anchor, losses[i], start_grad(take(inputs, i)), take(out.state, i), bound)

    def body(c):
      trips, carry, _ = c
      carry, done = one_step(take(inputs, i), carry, jnp.array(True))
      return trips + 1, carry, ~done

    start = _stack.match_varying((jnp.zeros((), jnp.int32), carry, bound > 0), losses)
    trips, carry, _ = jax.lax.while_loop(lambda c: (c[0] < num_steps) & c[2], body, start)
    mine = LocalOutcome(params=carry.params, loss=carry.loss, state=carry.state, num_steps=trips)
    return jax.tree.map(lambda acc, x: acc.at[i].set(x), out, mine)

  n = losses.shape[0]
  init = LocalOutcome(params=jax.tree.map(lambda p: jnp.zeros((n,) + p.shape, p.dtype), anchor),
                      loss=jnp.zeros_like(losses), state=states,
                      num_steps=jnp.zeros((n,), jnp.int32))
  return jax.lax.fori_loop(0, n, subdomain, _stack.match_varying(init, losses))


# The solvers live in ``aptsjax.optim.local_solvers`` (which imports this module); their names
# still resolve here.
_SOLVERS = ("trust_region_local_solver", "adam_trust_region_local_solver", "optax_local_solver",
            "solver_for", "radius_start", "refresh_gradient", "carried")


def __getattr__(name: str):
  if name in _SOLVERS:
    from aptsjax.optim import local_solvers  # pylint: disable=import-outside-toplevel
    return getattr(local_solvers, name)
  raise AttributeError(f"module 'aptsjax.optim.local' has no attribute {name!r}")
