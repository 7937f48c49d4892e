"""APTS inside your own ``jax.shard_map``: ``aptsjax.apts(axis_name="data")`` on a device mesh.

Shows the pieces ``aptsjax.parallel.apts_trainer`` assembles for you, written out: a 1-D mesh
from ``jax.make_mesh`` (its axis is Explicit, the JAX default, so every input is placed with its
sharding before the call), the state sharded by ``aptsjax.state_specs`` (per-subdomain L-SR1
memories split over the devices, the rest replicated), the batch's rows split over the devices
(each device holds N / D of the N = 8 contiguous subdomains), and the global gradient as the
gradient of the ``pmean`` of the shard losses (check_vma=True, the shard_map default).

On a machine without accelerators the script simulates 4 CPU devices (XLA_FLAGS, set before
jax is imported, unless XLA_FLAGS already sets a device count); on GPUs or TPUs it uses the real
ones, as many as divide N = 8.

The problem: a 2-16-2 MLP classifying points of the plane as inside or outside a circle.

Run from the repository root::

    python examples/shard_map.py            # 100 APTS iterations on 4,096 points
    python examples/shard_map.py --quick    # 5 iterations on 512 points
"""
from __future__ import annotations

import cpu_devices  # examples/ is on sys.path when one of its scripts runs

cpu_devices.simulate(4)   # before jax is imported; GPUs and TPUs ignore it

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import aptsjax  # noqa: E402
from circle import logits, loss_fn, make_problem, sizes  # noqa: E402


def main(argv: list[str] | None = None) -> None:
  rows, iterations = sizes(__doc__, quick=(512, 5), full=(4096, 100), argv=argv)
  params, batch = make_problem(rows)        # rows: a multiple of N = 8
  first_loss = float(loss_fn(params, batch))

  # --8<-- [start:shard_map]
  num_devices = aptsjax.parallel.default_num_devices(8)   # the most devices that divide N = 8
  mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])
  tx = aptsjax.apts(loss_fn, num_subdomains=8, axis_name="data")
  state = tx.init(params)
  specs = aptsjax.state_specs(state, "data")     # P("data") on per-subdomain leaves, P() else
  # The mesh axis is Explicit: place every input with the sharding its in_spec names.
  state = jax.device_put(state, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))

  def step(params, state, shard):
    grads = jax.grad(lambda p: jax.lax.pmean(loss_fn(p, shard), "data"))(params)
    updates, state = tx.update(grads, state, params, batch=shard)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), specs, P("data")),
                               out_specs=(P(), specs)))
  for _ in range(iterations):
    params, state = step(params, state, batch)
  # --8<-- [end:shard_map]

  x, y = batch
  accuracy = float(jnp.mean(jnp.argmax(logits(params, x), axis=1) == y))
  print(f"APTS N=8 under shard_map on {num_devices} {jax.default_backend()} device(s), "
        f"{iterations} iterations: loss {first_loss:.4f} -> {float(state.value):.4f}, "
        f"train accuracy {accuracy:.1%}")
  assert float(state.value) < first_loss, "the loss did not decrease"


if __name__ == "__main__":
  main()
