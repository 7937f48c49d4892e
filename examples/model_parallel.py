"""APTS on a 2-D (data x model) mesh: tensor-parallel and FSDP-style parameters, equal to one device.

``aptsjax.parallel.apts_trainer(..., num_devices=D, model_devices=M, param_specs=specs)`` builds a
D x M mesh: D replicas (the data axis, over which the subdomains are spread) of M devices each
(the model axis, over which every parameter is sharded as its PartitionSpec says). The gradients,
every L-SR1 stack and every per-subdomain state are sharded like the parameters, so each device
holds about 1/M of the replicated optimizer state. Two layouts of the same 2-16-2 MLP:

* tensor parallel: the first kernel split by columns, the second by rows (Megatron style), on a
  1 x 4 mesh (one replica of four devices);
* FSDP style: every kernel split along its first dimension, on a 2 x 2 mesh.

Both runs equal the single-device run up to float rounding; the script prints the largest
difference of the parameters and the per-device bytes of parameters and optimizer state. It runs
in float64, where "equal" can be checked tightly: the meshes only reorder sums, and the
trajectory amplifies those 1e-16 differences to about 5e-15 after 3 iterations and 1e-8 after
50, so the check allows 1e-6 relative. In float32 the same amplification reaches about 1e-3
after 50 iterations.

On a machine without accelerators the script simulates 4 CPU devices (XLA_FLAGS, set before
jax is imported, unless XLA_FLAGS already sets a device count).

Run from the repository root::

    python examples/model_parallel.py            # 50 APTS iterations on 4,096 points
    python examples/model_parallel.py --quick    # 3 iterations on 512 points
"""
from __future__ import annotations

import cpu_devices  # examples/ is on sys.path when one of its scripts runs

cpu_devices.simulate(4)   # before jax is imported; GPUs and TPUs ignore it

# pylint: disable=wrong-import-position
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)   # float64: the equality is checked tightly

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import aptsjax  # noqa: E402
from circle import loss_fn, make_problem, sizes  # noqa: E402


# --8<-- [start:mesh]
TENSOR_PARALLEL = {"w1": P(None, "model"), "b1": P("model"),   # first kernel by columns,
                   "w2": P("model", None), "b2": P()}          # second by rows
FSDP = {"w1": P("model", None), "b1": P("model"),              # every kernel on its first
        "w2": P("model", None), "b2": P()}                     # dimension


def train(params, batch, iterations, **mesh):
  """APTS (N = 4, second order) on the mesh that ``mesh`` describes, e.g.
  ``num_devices=2, model_devices=2, param_specs=FSDP``: 2 replicas of 2 devices."""
  trainer = aptsjax.parallel.apts_trainer(loss_fn, 4, second_order=True, **mesh)
  params = trainer.replicate(params)     # sharded over the model axis as param_specs says
  state, laid = trainer.init(params), trainer.shard_batch(batch)   # the state too
  for _ in range(iterations):
    params, state = trainer.step(params, state, laid)
  return params, state
# --8<-- [end:mesh]


def on_device0(tree) -> int:
  """Bytes of ``tree`` held by the first device."""
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == jax.devices()[0])


def main(argv: list[str] | None = None) -> None:
  rows, iterations = sizes(__doc__, quick=(512, 3), full=(4096, 50), argv=argv)
  params, (x, y) = make_problem(rows)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
  batch = (x.astype("float64"), y)
  if len(jax.devices()) < 4:
    print(f"this example needs 4 devices, found {len(jax.devices())}")
    return

  runs = {"1 device": {"num_devices": 1},
          "tensor parallel 1 x 4": {"num_devices": 1, "model_devices": 4,
                                    "param_specs": TENSOR_PARALLEL},
          "FSDP 2 x 2": {"num_devices": 2, "model_devices": 2, "param_specs": FSDP}}
  reference = None
  for name, mesh in runs.items():
    got, state = train(jax.tree.map(jnp.copy, params), batch, iterations, **mesh)
    held = on_device0((got, state))
    got = aptsjax.parallel.numpy_tree(got)
    reference = got if reference is None else reference
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)))
    print(f"{name:>22}: loss {float(state.value):.6f}, max |params - 1 device| {diff:.1e}, "
          f"{held:,} bytes of params + state on device 0")
    scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(reference))
    assert diff < 1e-6 * scale, f"{name} differs from the single-device run"


if __name__ == "__main__":
  main()
