"""Checkpoint and resume: a resumed APTS run continues the exact trajectory of an uninterrupted one.

Shows ``aptsjax.checkpoint.save`` / ``latest_step`` / ``restore`` (orbax underneath) in a training
function that resumes from the newest checkpoint of its directory. The state's per-subdomain
L-SR1 memories are sharded over the devices; each process writes and reads only its own shards,
and ``restore`` reads them back into the shardings of the fresh ``like`` tree. The script trains
to step k and stops (an interrupted run), resumes in a fresh state to step 2 k, and checks that
the parameters and the whole optimizer state equal, bit for bit, those of a run that was never
interrupted.

The problem: a 2-16-2 MLP classifying points of the plane as inside or outside a circle,
full-batch APTS with N = 4 subdomains, on as many devices as divide 4.

Run from the repository root::

    python examples/checkpoint_resume.py                 # k = 10, in a temporary directory
    python examples/checkpoint_resume.py --quick         # k = 2
    python examples/checkpoint_resume.py --dir ckpt      # keep them in ckpt/ (new or empty)
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import aptsjax
from circle import logits, loss_fn, make_problem


# --8<-- [start:checkpoint]
def train(trainer: aptsjax.parallel.Trainer, params: Any, batch: Any, directory: str, until: int,
          save_every: int) -> tuple[Any, Any]:
  """Trains to step ``until``, resuming from the newest checkpoint in ``directory`` if any."""
  params, state = trainer.replicate(params), trainer.init(params)  # also the shape of a restore
  start = aptsjax.checkpoint.latest_step(directory) or 0            # None: no checkpoint yet
  if start:
    back = aptsjax.checkpoint.restore(directory, like={"params": params, "state": state})
    params, state = back["params"], back["state"]
  for step in range(start, until):
    params, state = trainer.step(params, state, batch)
    if (step + 1) % save_every == 0:                                 # every process calls save
      aptsjax.checkpoint.save(directory, step + 1, {"params": params, "state": state})
  return params, state
# --8<-- [end:checkpoint]


def identical(a: Any, b: Any) -> bool:
  """Whether two pytrees have the same structure and bit-identical leaves."""
  a, b = aptsjax.parallel.numpy_tree(a), aptsjax.parallel.numpy_tree(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y, equal_nan=True) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, k = 2")
  parser.add_argument("--dir", default=None,
                      help="checkpoint directory, new or empty (default: a temporary one)")
  args = parser.parse_args(argv)
  rows, k = (512, 2) if args.quick else (4096, 10)
  if args.dir and os.path.isdir(args.dir) and os.listdir(args.dir):
    parser.error(f"--dir {args.dir} is not empty; give a new or empty directory")
  params, data = make_problem(rows)
  trainer = aptsjax.parallel.apts_trainer(loss_fn, num_subdomains=4, local_steps=3)
  batch = trainer.shard_batch(data)
  with tempfile.TemporaryDirectory() as scratch:
    root = args.dir or scratch
    resumed_dir, reference_dir = os.path.join(root, "resumed"), os.path.join(root, "uninterrupted")
    train(trainer, params, batch, resumed_dir, until=k, save_every=k)    # stops after step k
    print(f"interrupted at step {aptsjax.checkpoint.latest_step(resumed_dir)}; resuming")
    resumed = train(trainer, params, batch, resumed_dir, until=2 * k, save_every=k)
    reference = train(trainer, params, batch, reference_dir, until=2 * k, save_every=k)
  same = identical(resumed, reference)
  x, y = data
  accuracy = float(jnp.mean(jnp.argmax(logits(resumed[0], x), axis=1) == y))
  print(f"APTS N=4, {2 * k} steps, resumed at step {k}: loss {float(resumed[1].value):.4f}, "
        f"train accuracy {accuracy:.1%}; resumed run identical to the uninterrupted one: {same}")
  assert same, "the resumed run differs from the uninterrupted one"


if __name__ == "__main__":
  main()
