"""The toy problem of the examples: is a point of the plane inside a circle?

Points are standard normal in 2-D and labelled 1 inside the circle of radius sqrt(1.4) (about
half of them), so the classes are not linearly separable; the plain-JAX examples fit a 2-16-2
tanh MLP with softmax cross-entropy, the Flax examples the same network as a Flax module.
Everything here is numpy or jax.numpy, seeded, so every process of a multi-process run builds
the same arrays.
"""
from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = dict[str, jax.Array]
Batch = tuple[jax.Array, jax.Array]


def make_data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``rows`` labelled points of the plane: is the point inside the circle?"""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, 2)).astype(np.float32)
  return x, (np.sum(x**2, axis=1) < 1.4).astype(np.int32)


def make_problem(rows: int, seed: int = 0) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]:
  """Initial MLP parameters (seed ``seed``) and ``rows`` labelled points."""
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(2, 16)).astype(np.float32), "b1": np.zeros(16, np.float32),
            "w2": (0.1 * rng.normal(size=(16, 2))).astype(np.float32),
            "b2": np.zeros(2, np.float32)}
  return params, make_data(rows, seed + 1)


def logits(params: Params, x: jax.Array) -> jax.Array:
  """The MLP's class scores for the rows of ``x``."""
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss_fn(params: Params, batch: Batch) -> jax.Array:
  """Mean cross-entropy over the rows of ``batch = (x, y)``."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(scores: jax.Array, y: jax.Array) -> float:
  """The fraction of rows whose highest score is their label."""
  return float(jnp.mean(jnp.argmax(scores, axis=1) == y))


def sizes(doc: str, quick: tuple[Any, ...], full: tuple[Any, ...],
          argv: list[str] | None = None) -> tuple[Any, ...]:
  """Parses a script's command line (``--quick`` alone) and returns ``quick`` or ``full``.

  Args:
    doc: the script's docstring; its first line is the ``--help`` description.
    quick: the sizes of the ``--quick`` run (tiny, a few iterations).
    full: the sizes of the default run.
    argv: the arguments (default: ``sys.argv[1:]``).
  """
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help=f"tiny sizes {quick} instead of {full}")
  return quick if parser.parse_args(argv).quick else full
