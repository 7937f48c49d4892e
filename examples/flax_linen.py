"""Flax Linen: ``aptsjax.trust_region`` in a ``TrainState``, via ``apply_train_state``.

``TrainState.apply_gradients(grads=..., **kw)`` treats keywords as fields to replace and never
passes them to ``tx.update``, so the trust-region method would not see its batch;
``aptsjax.flax.apply_train_state(state, grads, batch=..., value=...)`` is the drop-in
replacement that does. The loss must be deterministic (no dropout, no batch statistics).

The problem: a 2-16-2 MLP classifying points of the plane as inside or outside a circle,
full batch.

Run from the repository root::

    python examples/flax_linen.py            # 300 iterations on 2,048 points
    python examples/flax_linen.py --quick    # 20 iterations on 256 points
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import aptsjax
from circle import make_data, sizes
from aptsjax.flax import apply_train_state


def main(argv: list[str] | None = None) -> None:
  rows, iterations = sizes(__doc__, quick=(256, 20), full=(2048, 300), argv=argv)
  batch = make_data(rows)

  # --8<-- [start:linen]
  module = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(2)])
  params = module.init(jax.random.key(0), batch[0])["params"]

  def loss_fn(params, batch):
    x, y = batch
    logits = module.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  state = train_state.TrainState.create(apply_fn=module.apply, params=params,
                                        tx=aptsjax.trust_region(loss_fn))

  @jax.jit
  def train_step(state, batch):
    value, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return apply_train_state(state, grads, batch=batch, value=value), value

  for _ in range(iterations):
    state, value = train_step(state, batch)
  # --8<-- [end:linen]

  x, y = batch
  final = float(loss_fn(state.params, batch))
  accuracy = float(jnp.mean(jnp.argmax(state.apply_fn({"params": state.params}, x), axis=1) == y))
  print(f"Flax Linen + trust region, {int(state.step)} steps: loss {final:.4f} "
        f"(before the last step {float(value):.4f}), train accuracy {accuracy:.1%}")
  assert final < 0.5, "the loss did not fall below 0.5"


if __name__ == "__main__":
  main()
