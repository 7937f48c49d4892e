"""Full-batch training with the trust-region method, reusing the gradient the optimizer computed.

Shows ``aptsjax.trust_region`` (second order: L-SR1 model solved by OBS, no learning rate) as an
optax transformation in a jitted step, with ``aptsjax.value_and_grad_from_state`` so that every
iteration after the first costs one forward and one backward pass: the loss and gradient at the
current parameters are those of the last accepted trial point, kept in the optimizer state.

The problem: a 2-16-2 MLP classifying points of the plane as inside or outside a circle.

Run from the repository root::

    python examples/trust_region_full_batch.py            # 300 iterations on 2,048 points
    python examples/trust_region_full_batch.py --quick    # 20 iterations on 256 points
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import aptsjax
from circle import logits, loss_fn, make_problem, sizes


def main(argv: list[str] | None = None) -> None:
  rows, iterations = sizes(__doc__, quick=(256, 20), full=(2048, 300), argv=argv)
  params, batch = make_problem(rows)
  first_loss = float(loss_fn(params, batch))

  # --8<-- [start:step]
  tx = aptsjax.trust_region(loss_fn, memory=10)          # loss_fn(params, batch) -> scalar
  state = tx.init(params)
  value_and_grad = aptsjax.value_and_grad_from_state(loss_fn)

  @jax.jit
  def step(params, state, batch):
    value, grads = value_and_grad(params, batch, state=state)   # reused after the first step
    updates, state = tx.update(grads, state, params, batch=batch, value=value)
    return optax.apply_updates(params, updates), state

  for _ in range(iterations):
    params, state = step(params, state, batch)
  # --8<-- [end:step]

  x, y = batch
  accuracy = float(jnp.mean(jnp.argmax(logits(params, x), axis=1) == y))
  print(f"trust region, {iterations} iterations ({int(state.num_accepted)} accepted): "
        f"loss {first_loss:.4f} -> {float(state.value):.4f}, train accuracy {accuracy:.1%}, "
        f"radius {float(state.radius):.3g}")
  assert float(state.value) < first_loss, "the loss did not decrease"


if __name__ == "__main__":
  main()
