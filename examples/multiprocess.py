"""APTS across processes with ``jax.distributed``: one script, started once per process.

Shows ``aptsjax.distributed.initialize()`` (a no-op in a single process; the settings come from
``python -m aptsjax.parallel.launch``, or from the cluster with ``initialize(auto=True)``) and the same
``aptsjax.parallel.apts_trainer`` loop as on one machine: the mesh spans every process's devices,
each process reads only the rows of its own subdomains from the global minibatch (which every
process builds identically), parameters and metrics come back replicated on every process, and
only process 0 prints.

The problem: a 2-16-2 MLP classifying points of the plane as inside or outside a circle, SAPTS
with N = 4 subdomains (N must be a multiple of the process count).

Run from the repository root, as 2 processes of 2 CPU devices each on this machine::

    python -m aptsjax.parallel.launch --num-processes 2 --devices-per-process 2 -- python examples/multiprocess.py --quick
    python -m aptsjax.parallel.launch --num-processes 2 --devices-per-process 2 -- python examples/multiprocess.py

or as a single process (``python examples/multiprocess.py --quick``), or on a cluster with
``initialize(auto=True)`` under SLURM, Open MPI or a TPU pod.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import aptsjax
from circle import logits, loss_fn, make_problem, sizes


def main(argv: list[str] | None = None) -> None:
  # 129 and 660 rows fill the 4 subdomains of the 5% overlap layout exactly (no row left out).
  rows, batch_size, epochs = sizes(__doc__, quick=(1024, 129, 2), full=(8192, 660, 10),
                                  argv=argv)

  params, train = make_problem(rows)   # the same numpy arrays on every process (seeded)

  # --8<-- [start:multiprocess]
  aptsjax.distributed.initialize()   # before anything touches jax.devices(); no-op in one process
  trainer = aptsjax.parallel.apts_trainer(loss_fn, num_subdomains=4, overlap=0.05)  # all devices
  params, state = trainer.replicate(params), trainer.init(params)
  for epoch in range(epochs):
    for batch in aptsjax.data.iterate_minibatches(train, batch_size, overlap=0.05, epoch=epoch):
      params, state = trainer.step(params, state, trainer.shard_batch(batch))  # own rows only
    metrics = trainer.metrics(state)           # loss, radius, local_steps, ...: replicated
    if aptsjax.distributed.is_main_process():  # log and write files on process 0 only
      print(f"epoch {epoch}: minibatch loss {float(metrics['value']):.4f}")
  # --8<-- [end:multiprocess]

  params = aptsjax.parallel.numpy_tree(params)   # every process calls it, at the same point
  if aptsjax.distributed.is_main_process():
    _, test = make_problem(1024, seed=1)
    first_loss = float(loss_fn(make_problem(rows)[0], test))   # at the initial parameters
    test_loss = float(loss_fn(params, test))
    x, y = test
    accuracy = float(jnp.mean(jnp.argmax(logits(params, x), axis=1) == y))
    print(f"SAPTS N=4 on {jax.process_count()} process(es), {jax.device_count()} device(s) in all, "
          f"{epochs} epoch(s): test loss {first_loss:.4f} -> {test_loss:.4f}, "
          f"test accuracy {accuracy:.1%}")
    assert test_loss < first_loss, "the test loss did not decrease"


if __name__ == "__main__":
  main()
