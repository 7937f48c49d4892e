"""The options of ``aptsjax.APTSConfig`` and the paper's method, side by side on one problem.

Every constructor takes ``base=`` (a config: ``aptsjax.APTSConfig()``, the defaults, or
``aptsjax.APTSConfig.paper()``, the paper's method exactly; ``aptsjax.TrustRegionConfig`` for
``aptsjax.trust_region``) and keyword overrides of its fields. This
script trains SAPTS (N = 4, 5% overlap) with the defaults, the paper's method, the scaled trust
region, local trust region in place of the default local steps (Adam's direction at the local
trust region's length), and an optax transformation as the local solver, then the paper's plain
trust region, and prints each test loss.

The problem: the 2-16-2 MLP and circle data of the other examples (``circle.py``).

Run from the repository root::

    python examples/options.py             # 3 epochs of 8,192 points, minibatches of 660
    python examples/options.py --quick     # 3 epochs of 1,024 points, minibatches of 129

None of these has a learning rate. The optax local solver here is Adam's direction without a
rate (``optax.scale_by_adam()`` then a sign flip); APTS projects every local point onto the local
region, so the region, not a rate, bounds its steps (an optax optimizer with a rate, such as
``optax.sgd(1e-2)``, works the same way, its steps below the bound then the rate's).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import aptsjax
from circle import loss_fn, make_problem


def train(trainer: aptsjax.parallel.Trainer, params, train_set, batch_size: int, epochs: int):
  """``epochs`` SAPTS epochs from ``params`` (copied: the step donates its inputs)."""
  params = trainer.replicate(jax.tree.map(jnp.copy, params))
  state = trainer.init(params)
  for epoch in range(epochs):
    for batch in aptsjax.data.iterate_minibatches(train_set, batch_size, overlap=0.05,
                                                  epoch=epoch):
      params, state = trainer.step(params, state, trainer.shard_batch(batch))
  return aptsjax.parallel.numpy_tree(params)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes")
  args = parser.parse_args(argv)
  # 129 and 660 rows fill the 4 subdomains of the 5% overlap layout exactly (no row left out).
  rows, batch_size, epochs = (1024, 129, 3) if args.quick else (8192, 660, 3)
  params, train_set = make_problem(rows)
  _, test = make_problem(1024, seed=1)
  first_loss = float(loss_fn(params, test))

  # --8<-- [start:options]
  trainers = {
      "defaults": aptsjax.parallel.apts_trainer(loss_fn, 4, overlap=0.05),
      "paper": aptsjax.parallel.apts_trainer(loss_fn, 4, overlap=0.05, second_order=True,
                                             base=aptsjax.APTSConfig.paper()),
      "region |D s| <= Delta": aptsjax.parallel.apts_trainer(loss_fn, 4, overlap=0.05,
                                                             norm="rms"),
      "local trust region": aptsjax.parallel.apts_trainer(loss_fn, 4, overlap=0.05,
                                                          local_solver="trust_region"),
      # Any optax transformation: Adam's direction unscaled (about one per coordinate), each
      # local point projected onto the local region, so the region sets the step length.
      "optax: Adam's direction at the bound": aptsjax.parallel.apts_trainer(
          loss_fn, 4, overlap=0.05,
          local_solver=optax.chain(optax.scale_by_adam(), optax.scale(-1.0))),
  }
  paper_tr = aptsjax.trust_region(loss_fn, base=aptsjax.TrustRegionConfig.paper())
  # --8<-- [end:options]

  for name, trainer in trainers.items():
    loss = float(loss_fn(train(trainer, params, train_set, batch_size, epochs), test))
    print(f"SAPTS N=4, {name}: test loss {first_loss:.4f} -> {loss:.4f}")
    assert loss < first_loss, f"{name}: the test loss did not decrease"

  full = tuple(jnp.asarray(a) for a in train_set)
  step = jax.jit(lambda p, s: paper_tr.update(jax.grad(loss_fn)(p, full), s, p, batch=full))
  p, state = params, paper_tr.init(params)
  for _ in range(10 * epochs):
    updates, state = step(p, state)
    p = optax.apply_updates(p, updates)
  loss = float(loss_fn(p, test))
  print(f"paper's trust region, {10 * epochs} full-batch steps: test loss {first_loss:.4f} -> "
        f"{loss:.4f}")
  assert loss < first_loss, "trust region: the test loss did not decrease"


if __name__ == "__main__":
  main()
