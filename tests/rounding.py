"""The error model of the float32 equivalence tests (one device vs D devices vs P processes).

Runs that differ only in where the sums are taken (a psum over devices, an all-reduce over
processes, a different vectorisation of the same loop) compute every reduction in another order.
Each reordered sum differs from the original by a few units in the last place (ulps) of its
magnitude, and from then on the iteration carries that difference along exactly as it would carry
a perturbation of its inputs of the same relative size. So the distance between two such runs is
bounded by the response of the computation to ulp-sized perturbations of its inputs, which we
measure on the machine that runs the test rather than assume:

    spread  = max over probes p of |run(params * (1 + PROBE_ULPS eps r_p)) - run(params)|,
              r_p a seeded random sign per element, eps = float32 machine epsilon,
    assert    |run_D(params) - run_1(params)| <= FACTOR * spread + FLOOR_ULPS eps |run_1(params)|

per quantity (parameters as one vector in the 2-norm, loss, radius). The response of a trust-region
trajectory to ulp-level noise depends on the machine (vector width, fusion, thread count): the
second-order trajectory of test_apts.py moves by 3e-4..8e-4 (relative) for a 4-ulp input
perturbation, while reordering the sums moves it by 6e-6..3e-5 on the configurations we checked
(default and test-suite XLA flags, AVX-512, AVX2 and SSE4.2 code paths). FACTOR leaves room for the
reordered sums to act as a larger perturbation than PROBE_ULPS at the inputs; a real defect of the
sharded code path (a missing or doubled all-reduce, a wrong shard) moves the result by O(1) and
fails by orders of magnitude. A decision of the ratio test that flips under such noise shows up
in the probes too (their spread then covers it), instead of failing on one machine only.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
PROBE_ULPS = 4.0
PROBES = 3
FACTOR = 4.0
FLOOR_ULPS = 16.0


def flat(tree: Any) -> np.ndarray:
  """All leaves of a pytree as one float64 vector (ravel order of ``jax.tree.leaves``)."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def perturbed(tree: Any, seed: int, ulps: float = PROBE_ULPS) -> Any:
  """``tree`` with each element scaled by 1 +- ulps * eps32 (seeded random signs), same dtypes."""
  rng = np.random.default_rng(seed)

  def one(x):
    x = np.asarray(x)
    return (x * (1.0 + ulps * EPS32 * rng.choice([-1.0, 1.0], x.shape))).astype(x.dtype)

  return jax.tree.map(one, tree)


def distance(a: Any, b: Any) -> float:
  """The 2-norm distance of two pytrees (or scalars) taken as vectors."""
  return float(np.linalg.norm(flat(a) - flat(b)))


def probe_spread(run: Callable[[Any], dict[str, Any]], params: Any,
                 reference: dict[str, Any]) -> dict[str, float]:
  """Per quantity, the largest distance from ``reference`` of ``run`` on perturbed params."""
  spread = {key: 0.0 for key in reference}
  for seed in range(PROBES):
    probe = run(perturbed(params, seed))
    for key in reference:
      spread[key] = max(spread[key], distance(probe[key], reference[key]))
  return spread


def assert_within_rounding(result: dict[str, Any], reference: dict[str, Any],
                           spread: dict[str, float], label: str) -> None:
  """Asserts the error model above for every quantity of ``reference``."""
  for key, ref in reference.items():
    bound = FACTOR * spread[key] + FLOOR_ULPS * EPS32 * float(np.linalg.norm(flat(ref)))
    got = distance(result[key], ref)
    assert got <= bound, (
        f"{label}: {key} differs from the reference by {got:.3e} (2-norm), more than float32 "
        f"rounding explains: {FACTOR} x probe spread {spread[key]:.3e} + {FLOOR_ULPS} ulps of "
        f"|reference| = {bound:.3e}")
