"""APTS under ``jax.pmap``, with ``aptsjax.parallel.pmap_state`` / ``unpmap_state``.

Shows ``aptsjax.apts(axis_name="data")`` in a ``jax.pmap`` step: the state converted to pmap
form (per-subdomain leaves split over a leading device axis, the rest replicated), the batch
reshaped to one block of rows per device (device d holds subdomains [d N / D, (d + 1) N / D) of
the N = 8 contiguous subdomains, as under ``jax.shard_map``), the parameters passed once to every
device (``in_axes=None``) and the global gradient all-reduced with ``pmean``. The state is
converted back to the global layout at the end.

On a machine without accelerators the script simulates 4 CPU devices (XLA_FLAGS, set before
jax is imported, unless XLA_FLAGS already sets a device count); on GPUs or TPUs it uses the real
ones, as many as divide N = 8.

The problem: a 2-16-2 MLP classifying points of the plane as inside or outside a circle.

Run from the repository root::

    python examples/pmap.py            # 100 APTS iterations on 4,096 points
    python examples/pmap.py --quick    # 5 iterations on 512 points
"""
from __future__ import annotations

import cpu_devices  # examples/ is on sys.path when one of its scripts runs

cpu_devices.simulate(4)   # before jax is imported; GPUs and TPUs ignore it

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import aptsjax  # noqa: E402
from circle import logits, loss_fn, make_problem, sizes  # noqa: E402


def main(argv: list[str] | None = None) -> None:
  rows, iterations = sizes(__doc__, quick=(512, 5), full=(4096, 100), argv=argv)
  params, batch = make_problem(rows)        # rows: a multiple of N = 8
  first_loss = float(loss_fn(params, batch))

  # --8<-- [start:pmap]
  num_devices = aptsjax.parallel.default_num_devices(8)   # the most devices that divide N = 8
  tx = aptsjax.apts(loss_fn, num_subdomains=8, axis_name="data")
  state = aptsjax.parallel.pmap_state(tx.init(params), num_devices)  # leading device axis
  shards = jax.tree.map(lambda a: a.reshape((num_devices, -1) + a.shape[1:]), batch)

  def step(params, state, shard):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, shard), "data")
    updates, state = tx.update(grads, state, params, batch=shard)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name="data", in_axes=(None, 0, 0), out_axes=(None, 0),
                  devices=jax.devices()[:num_devices])
  for _ in range(iterations):
    params, state = step(params, state, shards)
  state = aptsjax.parallel.unpmap_state(state)   # back to the global layout
  # --8<-- [end:pmap]

  x, y = batch
  accuracy = float(jnp.mean(jnp.argmax(logits(params, x), axis=1) == y))
  print(f"APTS N=8 under pmap on {num_devices} {jax.default_backend()} device(s), "
        f"{iterations} iterations: loss {first_loss:.4f} -> {float(state.value):.4f}, "
        f"train accuracy {accuracy:.1%}")
  assert float(state.value) < first_loss, "the loss did not decrease"


if __name__ == "__main__":
  main()
