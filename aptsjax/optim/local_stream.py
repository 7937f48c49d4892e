"""Local iterations over a stream of minibatches (docs/method.md, "Streams").

With a ``aptsjax.data.Stream`` of H minibatches, local iteration h of subdomain i works on

  f_{i,h}(theta) = f(theta; B_{i,h}) + <r_i, theta - theta^k>,

B_{i,h} being subdomain i's rows of minibatch h and r_i = g^k - grad f(theta^k; B_{i,0}) the
first-order consistency term fixed at the exchange (zero with ``consistency=False``): at
theta^k the first local objective has the global gradient g^k, and every later one differs from
f_{i,0} only by its data. Each iteration is one step of the wrapped solver on f_{i,h}: the value
and gradient at the current point are evaluated on minibatch h (iteration 0 has them from the
evaluation at theta^k), the trial point is evaluated on the same minibatch, and the local ratio
test compares those two values, so every local test is on one function.

The decrease a subdomain reports for the global test (6) is the sum over its iterations of
f_{i,h}(before) - f_{i,h}(after), each on its own minibatch. With a single minibatch the sum
telescopes to f_i(theta^k) - f_i(theta_i), the paper's denominator. The streamed carry's ``loss``
is f_i(theta^k) minus that sum, so that APTS's combine stage reads it as it reads a fixed-data
end loss; the wrapped solver's real loss travels in ``extra``.

A minibatch on which the loss is not finite stops its subdomain and makes its decrease NaN:
APTS then drops that subdomain's step (``apts_stages.combine``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from aptsjax.optim.local import LocalCarry
from aptsjax.optim.local import LocalSolver
from aptsjax.optim.local import keep_inactive


def streamed(solver: LocalSolver) -> LocalSolver:
  """``solver`` with iteration h on minibatch h of a stream.

  The returned solver's ``step`` takes ``value_and_grad(h, params)``; its carry's ``extra`` is
  (the solver's extra, the solver's loss on the current minibatch, h).

  Args:
    solver: a ``LocalSolver`` with a ``refresh``.

  Returns:
    The streamed ``LocalSolver`` (same ``init`` and ``rescale``).

  Raises:
    ValueError: ``solver.refresh`` is None.
  """
  if solver.refresh is None:
    raise ValueError("this local solver cannot read a Stream: it has no refresh (the function "
                     "that replaces its loss and gradient when the minibatch changes); give the "
                     "LocalSolver a refresh or pass a plain batch.")

  def start(params, loss, grad, state, bound):
    inner = solver.start(params, loss, grad, state, bound)
    return LocalCarry(params=inner.params, loss=loss, state=inner.state,
                      extra=(inner.extra, inner.loss, jnp.zeros((), jnp.int32)))

  def step(value_and_grad, carry, anchor, bound, active):
    extra, loss, h = carry.extra
    on_h = functools.partial(value_and_grad, h)
    inner = LocalCarry(params=carry.params, loss=loss, state=carry.state, extra=extra)
    inner = jax.lax.cond((h > 0) & active, lambda c: solver.refresh(c, *on_h(c.params)),
                         lambda c: c, inner)
    before = inner.loss
    finite = jnp.isfinite(before)
    inner, done = solver.step(on_h, inner, anchor, bound, active & finite)
    decrease = jnp.where(active, before - inner.loss, 0.0).astype(carry.loss.dtype)
    new = LocalCarry(params=inner.params, loss=carry.loss - decrease, state=inner.state,
                     extra=(inner.extra, inner.loss, h + 1))
    kept = keep_inactive(active, (new.loss, new.extra), (carry.loss, carry.extra))
    return new._replace(loss=kept[0], extra=kept[1]), done | ~finite

  return LocalSolver(init=solver.init, start=start, step=step, rescale=solver.rescale,
                     refresh=None)
