"""Flax NNX: ``aptsjax.trust_region`` as the transformation of an ``nnx.Optimizer``.

Shows ``aptsjax.flax.nnx_loss_fn``, which turns ``loss(model, batch)`` into the
``loss_fn(params, batch)`` the trust-region method evaluates at its trial points, and
``nnx.Optimizer.update(model, grads, batch=..., value=...)``, whose keywords reach ``tx.update``.
The model must be deterministic (no BatchNorm, Dropout or stored ``nnx.Rngs``): the ratio test
compares the loss at two parameter values.

The problem: a 2-16-2 MLP classifying points of the plane as inside or outside a circle,
full batch.

Run from the repository root::

    python examples/flax_nnx.py            # 300 iterations on 2,048 points
    python examples/flax_nnx.py --quick    # 20 iterations on 256 points
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

import aptsjax
from circle import make_data, sizes
from aptsjax.flax import nnx_loss_fn


def main(argv: list[str] | None = None) -> None:
  rows, iterations = sizes(__doc__, quick=(256, 20), full=(2048, 300), argv=argv)
  batch = make_data(rows)

  # --8<-- [start:nnx]
  def loss(model, batch):                 # deterministic: no BatchNorm / Dropout / stored Rngs
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  model = nnx.Sequential(nnx.Linear(2, 16, rngs=nnx.Rngs(0)), nnx.tanh,
                         nnx.Linear(16, 2, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, aptsjax.trust_region(nnx_loss_fn(model, loss)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    value, grads = nnx.value_and_grad(loss)(model, batch)
    optimizer.update(model, grads, batch=batch, value=value)  # keywords reach tx.update
    return value

  for _ in range(iterations):
    value = train_step(model, optimizer, batch)
  # --8<-- [end:nnx]

  x, y = batch
  final = float(loss(model, batch))
  accuracy = float(jnp.mean(jnp.argmax(model(x), axis=1) == y))
  print(f"Flax NNX + trust region, {iterations} iterations: loss {final:.4f} "
        f"(before the last step {float(value):.4f}), train accuracy {accuracy:.1%}")
  assert final < 0.5, "the loss did not fall below 0.5"


if __name__ == "__main__":
  main()
