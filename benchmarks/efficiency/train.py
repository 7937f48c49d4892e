"""Runs of the methods on the workers' streams, their scores against a target, and selection.

A run reads the stream of one seed in groups of H global minibatches, one exchange per group,
and evaluates the global parameters after every exchange on its split's evaluation rows (the
validation split while selecting, the test split after). Its rows count the exchanges and the
floats all-reduced so far (the per-exchange count read off the compiled program).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from benchmarks.common.output import Row, log
from benchmarks.common.progress import Progress
from benchmarks.efficiency import streams
from benchmarks.efficiency.methods import Method, jit
from benchmarks.efficiency.task import Task

PyTree = Any
TARGET_DROP = 0.005      # accuracy target: best - 0.5 points
LOSS_SLACK = 0.02        # loss target: best + 2%
EVAL_CHUNK = 4096        # evaluation rows per call


class Split(NamedTuple):
  """The rows of one phase: the training rows the streams read and the evaluation.

  Attributes:
    name: "val" (selection) or "test" (reported).
    train: the training rows (numpy pytree).
    evaluate: ``params -> metric`` on the evaluation rows.
  """
  name: str
  train: Any
  evaluate: Callable[[PyTree], float]


def evaluator(task: Task, batch: Any, chunk: int = EVAL_CHUNK) -> Callable[[PyTree], float]:
  """The task's metric over ``batch``, in chunks of at most ``chunk`` rows (a row-weighted mean
  of the chunks' means, exact for a metric that is a mean over rows).

  Args:
    task: the task.
    batch: the evaluation rows.
    chunk: rows per jitted call.

  Returns:
    ``params -> float``.
  """
  metric, rows = jit(task.metric_fn), task.rows(batch)
  parts = [jax.device_put(jax.tree.map(lambda x, s=s: np.asarray(x)[s:s + chunk], batch))
           for s in range(0, rows, chunk)]
  weights = [task.rows(p) / rows for p in parts]
  return lambda params: float(sum(w * metric(params, p) for w, p in zip(weights, parts)))


def make_split(task: Task, validation: bool) -> Split:
  """The selection split (``validation``) or the reported one."""
  train, evaluation = task.split(validation)
  return Split("val" if validation else "test", train, evaluator(task, evaluation))


def settings(config: Row) -> str:
  """A method's settings as text, e.g. ``"inner_lr=0.001 H=10 outer_lr=0.7"``."""
  return " ".join(f"{k}={v:g}" for k, v in config.items())


def describe(method: Method) -> str:
  """The method and its settings, e.g. ``"DiLoCo inner_lr=0.001 H=10 outer_lr=0.7"``."""
  return f"{method.name} {settings(method.config)}"


def run(method: Method, task: Task, split: Split, seed: int, batch: int, epochs: int,
        floats: int, bars: Progress, weight: float = 0.0) -> list[Row]:
  """One run: every complete group of H minibatches of the seed's stream, one exchange each.

  Args:
    method: the configured method.
    task: the task (its ``init(seed)`` starts the run).
    split: the rows.
    seed: the seed of the initial parameters and of the stream.
    batch: B, rows per global minibatch.
    epochs: epochs of the stream.
    floats: floats all-reduced per exchange (per device).
    bars: the progress display.
    weight: this run's share of the overall bar.

  Returns:
    One row per exchange: epoch, exchanges, floats and bytes so far, the metric, diagnostics.
  """
  stream = streams.make_stream(task.rows(split.train), method.workers, batch, seed, epochs)
  groups = streams.exchanges(stream, method.period)
  state, rows, start = method.init(task.init(seed)), [], time.perf_counter()
  label = f"{describe(method)} W={method.workers} seed={seed} ({split.name})"
  bar = bars.run(len(groups), label)
  for k, group in enumerate(groups, 1):
    state = method.exchange(state, streams.take(split.train, group))
    metric = split.evaluate(method.params(state))
    rows.append({"task": task.name, "split": split.name, "method": method.name,
                 "config": describe(method), "W": method.workers, "H": method.period,
                 "seed": seed, "exchange": k, "epoch": int(stream.epochs[k * method.period - 1]),
                 "minibatches": k * method.period, "floats": k * floats, "bytes": 4 * k * floats,
                 task.metric: metric, "wall_s": time.perf_counter() - start,
                 **method.diagnostics(state)})
    bar.set_postfix_str(f"{task.metric} {metric:.4f}")
    bar.update(1)
  bar.close()
  bars.advance(weight)
  best = best_metric(rows, task) if rows else math.nan
  log(f"[run] {label}: {len(groups)} exchanges, best {task.metric} {best:.4f}, "
      f"{time.perf_counter() - start:.1f} s")
  return rows


def target_of(best: float, higher_is_better: bool) -> float:
  """The target from the reference's best metric: 0.5 points below an accuracy, 2% above a
  loss."""
  return best - TARGET_DROP if higher_is_better else best * (1 + LOSS_SLACK)


def reached(value: float, target: float, higher_is_better: bool) -> bool:
  """Whether a metric value meets the target."""
  return value >= target - 1e-12 if higher_is_better else value <= target + 1e-12


def best_metric(rows: Sequence[Row], task: Task) -> float:
  """The best metric of a run's rows."""
  values = [r[task.metric] for r in rows if np.isfinite(r[task.metric])]
  if not values:
    return math.nan
  return max(values) if task.higher_is_better else min(values)


def score(rows: Sequence[Row], task: Task, target: float) -> Row:
  """A run against a target: its best metric and where it first met the target.

  Args:
    rows: the run's rows, in exchange order.
    task: the task.
    target: the metric to reach.

  Returns:
    ``best``, ``exchanges``, ``bytes``, ``epoch`` and ``minibatches`` at the first row that meets
    the target (None for each when none does).
  """
  hit = next((r for r in rows if reached(r[task.metric], target, task.higher_is_better)), None)
  at = lambda key: None if hit is None else hit[key]
  return {"best": best_metric(rows, task), "target": target, "exchanges": at("exchange"),
          "bytes": at("bytes"), "epoch": at("epoch"), "minibatches": at("minibatches")}


def choose(scores: Sequence[Row], higher_is_better: bool, by_exchanges: bool) -> int:
  """The index of the chosen configuration.

  Args:
    scores: one ``score`` row per configuration.
    higher_is_better: the metric's direction.
    by_exchanges: fewest exchanges to the target first (ties, or nobody reaching it: the best
      metric); otherwise the best metric alone.

  Returns:
    The index into ``scores``.
  """
  def key(i: int) -> tuple[float, float]:
    s = scores[i]
    best = s["best"] if np.isfinite(s["best"]) else (-math.inf if higher_is_better else math.inf)
    first = s["exchanges"] if by_exchanges and s["exchanges"] is not None else math.inf
    return (first if by_exchanges else 0.0, -best if higher_is_better else best)
  return min(range(len(scores)), key=key)


def periods_within(grid: Sequence[int], minibatches: int) -> tuple[int, ...]:
  """The periods H of ``grid`` that allow at least one exchange in the epoch budget
  (``minibatches`` global minibatches); the budget itself when none does."""
  return tuple(h for h in grid if h <= minibatches) or (minibatches,)
