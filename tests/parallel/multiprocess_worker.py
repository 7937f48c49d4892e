"""One process of the multi-process tests (tests/parallel/test_multiprocess.py); also imported by
them and by tests/parallel/test_checkpoint.py.

    python -m aptsjax.parallel.launch --num-processes 2 --devices-per-process 2 -- \\
        python tests/parallel/multiprocess_worker.py [--mismatch]
        [--out DIR [--ckpt DIR --save-at K [--resume-out DIR]]]

``--mismatch`` first makes process 1 disagree in N, parameter shapes and batch rows in turn and
prints each error the start-up checks raise. With ``--out``, the processes then run APTS on a small
MLP through ``aptsjax.parallel.apts_trainer`` over every process's devices and process 0 writes
``result.npz`` (per order: the loss and radius after each iteration, the final flat parameters).
``--resume-out`` then starts each order again from fresh trainer state and parameters, restores
the checkpoint saved after iteration K from disk, runs the remaining iterations and has process 0
write those results to ``result.npz`` in that directory (one launch, one JAX start-up, for all
three).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

NUM_SUBDOMAINS = 4
OVERLAP = 0.05
# 512 rows per subdomain: with ~128 the local curvature is so ill-conditioned that float32 rounding
# (a different all-reduce order) moves the third iterate by 1e-4.
ROWS = 2048


def problem(rows: int = ROWS, hidden: int = 8, seed: int = 0):
  """A small MLP regression problem as numpy float32 (params, (x, y))."""
  r = np.random.default_rng(seed)
  params = {"w1": (0.5 * r.normal(size=(4, hidden))).astype(np.float32),
            "b1": np.zeros(hidden, np.float32),
            "w2": (0.5 * r.normal(size=(hidden, 1))).astype(np.float32),
            "b2": np.zeros(1, np.float32)}
  x = r.normal(size=(rows, 4)).astype(np.float32)
  y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]).astype(np.float32)
  return params, (x, y)


def mlp_loss(params, batch):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y[:, None]) ** 2)


def flat(params) -> np.ndarray:
  return np.concatenate([np.asarray(params[k]).ravel() for k in sorted(params)])


@functools.lru_cache(maxsize=None)
def make_trainer(order: int, num_devices: int | None = None, num_subdomains: int = NUM_SUBDOMAINS):
  """One trainer (one compiled step) per configuration and process."""
  from aptsjax import parallel  # pylint: disable=import-outside-toplevel

  return parallel.apts_trainer(mlp_loss, num_subdomains, num_devices=num_devices, overlap=OVERLAP,
                               second_order=order == 2, local_steps=3, remainder="drop")


def run(order: int, iters: int, num_devices: int | None = None, *, ckpt: str | None = None,
        save_at: int = 0, resume: bool = False, params: dict | None = None
        ) -> dict[str, np.ndarray]:
  """APTS iterations; returns per-iteration loss and radius and the final flat parameters.

  ``params`` replaces the problem's initial parameters (the rounding probes of the tests).
  """
  import jax  # pylint: disable=import-outside-toplevel

  from aptsjax import checkpoint, parallel  # pylint: disable=import-outside-toplevel

  default_params, batch = problem()
  # trainer.step donates what it is given: the caller's params stay usable (rounding probes).
  params = jax.tree.map(np.array, default_params if params is None else params)
  trainer = make_trainer(order, num_devices)
  state, params = trainer.init(params), trainer.replicate(params)
  sharded = trainer.shard_batch(batch)
  first = 0
  if resume:
    first = checkpoint.latest_step(ckpt)
    back = checkpoint.restore(ckpt, {"params": params, "state": state})
    params, state = back["params"], back["state"]
  losses, radii, local = [], [], []
  for it in range(first, iters):
    params, state = trainer.step(params, state, sharded)
    metrics = parallel.numpy_tree(trainer.metrics(state))
    losses.append(float(metrics["value"]))
    radii.append(float(metrics["radius"]))
    local.append(metrics["local_steps"])
    if ckpt and not resume and it + 1 == save_at:
      checkpoint.save(ckpt, it + 1, {"params": params, "state": state})
  return {"loss": np.asarray(losses), "radius": np.asarray(radii), "params": flat(params),
          "local_steps": np.asarray(local)}


def check_rows() -> None:
  """Every process's rows, in process order, make up the whole laid-out batch."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  from aptsjax import data  # pylint: disable=import-outside-toplevel

  from aptsjax import parallel  # pylint: disable=import-outside-toplevel

  trainer = make_trainer(1)
  rows = trainer.process_rows(ROWS)
  gathered = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1)
  expected = data.overlap_layout(ROWS, NUM_SUBDOMAINS, OVERLAP)
  if not np.array_equal(gathered, expected) or jax.process_count() < 2:
    raise AssertionError(f"process rows {gathered} != layout {expected}")
  # Abstract evaluation of init and host copies of sharded per-subdomain leaves work too.
  params, _ = problem()
  shapes = jax.eval_shape(trainer.init, params)
  host = parallel.numpy_tree(trainer.init(params))
  if host.local_steps.shape != (NUM_SUBDOMAINS,) or shapes.local_steps.shape != (NUM_SUBDOMAINS,):
    raise AssertionError(f"local_steps {host.local_steps.shape}, {shapes.local_steps.shape}")


def mismatches() -> None:
  """Each start-up check must raise on every process when process 1 disagrees."""
  import jax  # pylint: disable=import-outside-toplevel

  odd = jax.process_index() == 1
  caught = []
  for stage in ("num_subdomains", "params", "rows"):
    try:
      trainer = make_trainer(1, num_subdomains=2 if odd and stage == "num_subdomains" else 4)
      params, batch = problem(rows=ROWS // 2 if odd and stage == "rows" else ROWS,
                              hidden=9 if odd and stage == "params" else 8)
      trainer.init(params)
      trainer.shard_batch(batch)
    except ValueError as error:
      print(f"MISMATCH {stage}: {error}", flush=True)
      caught.append(stage)
  if len(caught) != 3:
    raise SystemExit(f"only {caught} raised")


def run_orders(args: argparse.Namespace, resume: bool) -> dict[str, np.ndarray]:
  """``run`` for every order of ``--orders``, keyed ``{quantity}_o{order}``."""
  out = {}
  for order in args.orders:
    ckpt = os.path.join(args.ckpt, f"o{order}") if args.ckpt else None
    result = run(order, args.iters, ckpt=ckpt, save_at=args.save_at, resume=resume)
    out.update({f"{k}_o{order}": v for k, v in result.items()})
  return out


def write(directory: str, results: dict[str, np.ndarray]) -> None:
  """Process 0 writes ``directory/result.npz`` with the process and device counts added."""
  import jax  # pylint: disable=import-outside-toplevel

  import aptsjax  # pylint: disable=import-outside-toplevel

  results = dict(results, processes=np.asarray(jax.process_count()),
                 devices=np.asarray(jax.device_count()))
  if aptsjax.distributed.is_main_process():
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, "result.npz"), **results)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=None)
  p.add_argument("--orders", type=int, nargs="+", default=[1, 2])
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--ckpt", default=None)
  p.add_argument("--save-at", type=int, default=0)
  p.add_argument("--resume-out", default=None)
  p.add_argument("--mismatch", action="store_true")
  args = p.parse_args(argv)

  import aptsjax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  aptsjax.distributed.initialize(timeout=60)
  if args.mismatch:
    mismatches()
  if args.out:
    check_rows()
    write(args.out, run_orders(args, resume=False))
    if args.resume_out:
      write(args.resume_out, run_orders(args, resume=True))
  print(f"process {jax.process_index()} done", flush=True)
  return 0


if __name__ == "__main__":
  # The repository root (three levels up), so that this checkout's aptsjax is imported.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  sys.exit(main())
