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

The global test (6) is the paper's on the exchange's data: APTS evaluates each subdomain's first
local objective f_{i,0} at its end point theta_i (one forward pass per subdomain, no
communication) and takes sum_i f_{i,0}(theta^k) - f_{i,0}(theta_i) as the predicted reduction
of f(.; B_0) (``apts_stages.local_phase``). The later minibatches only help each subdomain find
theta_i, as a preconditioner would; the ratio then measures how well the combined step s~
keeps the subdomains' decreases on the data of the exchange.

A minibatch on which the loss at the current point is not finite stops its subdomain there (its
point so far is kept and judged on minibatch 0 like any other).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from aptsjax.optim.local import LocalSolver
from aptsjax.optim.local import keep_inactive


def streamed(solver: LocalSolver) -> LocalSolver:
  """``solver`` with iteration h on minibatch h of a stream.

  The returned solver's ``step`` takes ``value_and_grad(h, params)``; its carry's ``loss`` is
  the local objective on the current minibatch and its ``extra`` is (the solver's extra, h).

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
    return inner._replace(extra=(inner.extra, jnp.zeros((), jnp.int32)))

  def step(value_and_grad, carry, anchor, bound, active):
    extra, h = carry.extra
    on_h = functools.partial(value_and_grad, h)
    inner = jax.lax.cond((h > 0) & active, lambda c: solver.refresh(c, *on_h(c.params)),
                         lambda c: c, carry._replace(extra=extra))
    finite = jnp.isfinite(inner.loss)
    inner, done = solver.step(on_h, inner, anchor, bound, active & finite)
    new = inner._replace(extra=(inner.extra, h + 1))
    kept = keep_inactive(active, (new.loss, new.extra), (carry.loss, carry.extra))
    return new._replace(loss=kept[0], extra=kept[1]), done | ~finite

  return LocalSolver(init=solver.init, start=start, step=step, rescale=solver.rescale,
                     refresh=None)
