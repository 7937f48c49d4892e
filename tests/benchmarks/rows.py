"""Fabricated result rows of the paper benchmark (no training) for the summary and figure tests."""
from __future__ import annotations

from typing import Any

# method -> (kind, batching, order, N, backward passes per epoch, seconds per epoch, iterations
# per epoch, test accuracy after each of 3 epochs, train loss after each)
QUICK = {
    "APTS N=2 o1": ("apts", "full", "o1", 2, 4.0, 0.35, 1, (0.09, 0.23, 0.47), (2.30, 2.24, 2.01)),
    "SAPTS N=2 o1": ("apts", "minibatch", "o1", 2, 7.0, 0.6, 6, (0.77, 0.87, 0.89),
                     (0.74, 0.30, 0.13)),
    "SAPTS N=2 o2": ("apts", "minibatch", "o2", 2, 5.1, 1.0, 6, (0.67, 0.84, 0.865),
                     (1.54, 0.49, 0.28)),
    "TR o2": ("tr", "full", "o2", 1, 1.3, 0.2, 1, (0.07, 0.09, 0.14), (2.31, 2.30, 2.28)),
    "Adam": ("adam", "minibatch", "", 1, 0.97, 0.06, 6, (0.64, 0.84, 0.894), (1.03, 0.44, 0.24)),
    "SGD": ("sgd", "minibatch", "", 1, 0.97, 0.06, 6, (0.41, 0.58, 0.66), (2.11, 1.89, 1.61)),
}


def fabricate(table: dict[str, tuple] = QUICK, trials: int = 1) -> list[dict[str, Any]]:
  """Rows shaped like ``benchmarks.paper.paper.train``'s, one per method, seed and epoch."""
  rows = []
  for name, (kind, batching, order, n, passes, secs, iters, accs, losses) in table.items():
    for seed in range(trials):
      for ep, (acc, loss) in enumerate(zip(accs, losses), 1):
        rows.append({"method": name, "kind": kind, "batching": batching, "order": order,
                     "N": n, "param_blocks": "", "lr": 0.01 if kind in ("adam", "sgd") else 0.0,
                     "seed": seed, "epoch": ep, "train_loss": loss, "test_acc": acc,
                     "wall_s": secs * ep, "iterations": iters * ep,
                     "forward_passes": passes * ep, "backward_passes": passes * ep,
                     "allreduce_floats": 1e6 * ep, "processes": 1, "devices": 1})
  return rows
