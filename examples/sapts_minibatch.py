"""SAPTS: APTS on minibatches, on one device or several, through ``aptsjax.parallel.apts_trainer``.

Shows the one-call trainer (mesh, batch layout, jitted step) with the minibatch iterator of
``aptsjax.data``: every minibatch carries 5% of the previous one over, and is laid out as N = 4
subdomains sharing 5% of their rows. The same script runs on 1, 2 or 4 devices (``--devices``;
by default all the devices that divide N), with the same subdomains and results up to float
rounding.

The problem: a 2-16-2 MLP classifying points of the plane as inside or outside a circle.

Run from the repository root::

    python examples/sapts_minibatch.py              # 10 epochs of 8,192 points, minibatches of 660
    python examples/sapts_minibatch.py --quick      # 2 epochs of 1,024 points, minibatches of 129
    python examples/sapts_minibatch.py --devices 1
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp

import aptsjax
from circle import logits, loss_fn, make_problem


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, two epochs")
  parser.add_argument("--devices", type=int, default=None,
                      help="number of devices, dividing 4 (default: as many as divide 4)")
  args = parser.parse_args(argv)
  # 129 and 660 rows fill the 4 subdomains of the 5% overlap layout exactly (no row left out).
  rows, batch_size, epochs = (1024, 129, 2) if args.quick else (8192, 660, 10)
  params, train = make_problem(rows)
  _, test = make_problem(1024, seed=1)
  num_devices = args.devices
  first_loss = float(loss_fn(params, test))

  # --8<-- [start:trainer]
  trainer = aptsjax.parallel.apts_trainer(loss_fn, num_subdomains=4, num_devices=num_devices,
                                          local_steps=5, second_order=True, overlap=0.05)
  params, state = trainer.replicate(params), trainer.init(params)
  for epoch in range(epochs):
    for batch in aptsjax.data.iterate_minibatches(train, batch_size, overlap=0.05, epoch=epoch):
      params, state = trainer.step(params, state, trainer.shard_batch(batch))
    print(f"epoch {epoch}: minibatch loss {float(trainer.metrics(state)['value']):.4f}")
  # --8<-- [end:trainer]

  params = aptsjax.parallel.numpy_tree(params)
  x, y = test
  accuracy = float(jnp.mean(jnp.argmax(logits(params, x), axis=1) == y))
  test_loss = float(loss_fn(params, test))
  devices = 1 if trainer.mesh is None else trainer.mesh.size
  print(f"SAPTS N=4 on {devices} device(s), {epochs} epoch(s): test loss {first_loss:.4f} -> "
        f"{test_loss:.4f}, test accuracy {accuracy:.1%}")
  assert test_loss < first_loss, "the test loss did not decrease"


if __name__ == "__main__":
  main()
