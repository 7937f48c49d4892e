"""Multi-process start-up on top of ``jax.distributed``: a bounded wait and configuration checks.

APTS runs across hosts with JAX's own multi-controller runtime: one Python process per host (or
per GPU), ``jax.devices()`` listing every process's devices, one global mesh and collectives over
gloo (CPU), NCCL (GPU) or ICI (TPU). Nothing here manages processes or moves data; it adds what
``jax.distributed.initialize`` lacks for a training script:

* :func:`initialize` takes the coordinator settings from its arguments, from the environment that
  ``python -m aptsjax.parallel.launch`` sets (``APTSJAX_COORDINATOR``, ``APTSJAX_NUM_PROCESSES``,
  ``APTSJAX_PROCESS_ID``, ``APTSJAX_LOCAL_DEVICE_IDS``), or lets JAX detect the cluster (SLURM,
  Open MPI, TPU pods, ...) with ``auto=True``. A process that is not the coordinator first waits
  for the coordinator's port to accept connections, at most ``timeout`` seconds, and raises a
  ``TimeoutError`` naming the address if it never does, instead of blocking until JAX's own
  deadline aborts the interpreter.
* :func:`check_same` compares a configuration (numbers, strings, shapes, pytree structures) across
  processes at start-up through one small all-gather of per-field hashes, and raises a
  ``ValueError`` naming the fields and processes that differ; a mismatch found later would be a
  hang or silently wrong data instead.
* :func:`is_main_process` marks the process that logs and writes files (process 0).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

ENV_COORDINATOR = "APTSJAX_COORDINATOR"
ENV_NUM_PROCESSES = "APTSJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "APTSJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "APTSJAX_LOCAL_DEVICE_IDS"
DEFAULT_TIMEOUT = 120.0
_HASH_WORDS = 4  # 128-bit hash per configuration field.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"coordinator_address must be 'host:port', got {address!r}")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout: float, interval: float = 0.25) -> None:
  """Blocks until ``address`` ('host:port') accepts a TCP connection.

  Args:
    address: the coordinator's 'host:port'.
    timeout: seconds to keep trying.
    interval: seconds between attempts.

  Raises:
    TimeoutError: nothing accepted a connection within ``timeout`` seconds.
  """
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout
  last_error: OSError | None = None
  while True:
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(min(remaining, 2.0), 0.05)):
        return
    except OSError as error:
      last_error = error
    if time.monotonic() + interval > deadline:
      raise TimeoutError(
          f"could not reach the JAX coordinator at {address} within {timeout:g} s "
          f"(last error: {last_error}). Check that process 0 is running and listens on that "
          "address and port, that the port is open between the hosts, and that every process "
          "was given the same coordinator address.")
    time.sleep(interval)


def _env_settings() -> dict[str, Any]:
  settings: dict[str, Any] = {}
  if ENV_COORDINATOR in os.environ:
    settings["coordinator_address"] = os.environ[ENV_COORDINATOR]
  if ENV_NUM_PROCESSES in os.environ:
    settings["num_processes"] = int(os.environ[ENV_NUM_PROCESSES])
  if ENV_PROCESS_ID in os.environ:
    settings["process_id"] = int(os.environ[ENV_PROCESS_ID])
  if os.environ.get(ENV_LOCAL_DEVICE_IDS):
    settings["local_device_ids"] = [int(i) for i in os.environ[ENV_LOCAL_DEVICE_IDS].split(",")]
  return settings


def launched() -> bool:
  """Whether this process was started by ``python -m aptsjax.parallel.launch`` (its variables are set)."""
  return ENV_COORDINATOR in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               timeout: float = DEFAULT_TIMEOUT, auto: bool = False) -> bool:
  """Joins the multi-process JAX runtime, or does nothing in a single-process run.

  Settings come from the arguments, else from the variables ``python -m aptsjax.parallel.launch`` sets.
  With neither and ``auto=False`` this is a single-process run and nothing happens; with
  ``auto=True`` ``jax.distributed.initialize()`` detects the cluster itself (SLURM, Open MPI,
  TPU pods, Kubernetes, ...). Call it before anything else touches ``jax.devices()``.

  Args:
    coordinator_address: 'host:port' of process 0's coordination service.
    num_processes: the number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_ids: the local devices this process uses (e.g. one GPU per process).
    timeout: seconds a process waits for the coordinator (and JAX waits for all processes).
    auto: let JAX detect the cluster when no explicit settings are given.

  Returns:
    True if the multi-process runtime is up (now or already), False for a single-process run.

  Raises:
    ValueError: incomplete or inconsistent settings.
    TimeoutError: a non-coordinator process could not reach the coordinator within ``timeout``.
  """
  if jax.distributed.is_initialized():
    return True
  settings = _env_settings()
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id, "local_device_ids": local_device_ids}
  settings.update({k: v for k, v in explicit.items() if v is not None})
  if not settings:
    if not auto:
      return False
    jax.distributed.initialize(initialization_timeout=int(np.ceil(timeout)))
    return True
  missing = [k for k in ("coordinator_address", "num_processes", "process_id")
             if k not in settings]
  if missing:
    raise ValueError(f"multi-process settings are incomplete: missing {', '.join(missing)}")
  count, index = int(settings["num_processes"]), int(settings["process_id"])
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process_id={index} must lie in [0, num_processes={count})")
  if timeout <= 0:
    raise ValueError(f"timeout must be positive, got {timeout}")
  if index != 0:
    wait_for_coordinator(settings["coordinator_address"], timeout)
  print(f"[aptsjax] process {index} of {count}: joining the coordinator at "
        f"{settings['coordinator_address']}, waiting up to {timeout:g} s for all {count} processes "
        "(if one never joins, JAX stops this process with DEADLINE_EXCEEDED)",
        file=sys.stderr, flush=True)
  jax.distributed.initialize(initialization_timeout=int(np.ceil(timeout)), **settings)
  return True


def is_main_process() -> bool:
  """True on process 0, the one that prints logs and writes files."""
  return jax.process_index() == 0


def _text(value: Any) -> str:
  # Object addresses (functions, default reprs) differ between processes: drop them.
  return _ADDRESS.sub("", repr(value))


def _describe(value: Any) -> str:
  """A canonical text of a configuration value (arrays and pytrees by structure and shapes)."""
  leaves, treedef = jax.tree_util.tree_flatten(value)
  if not any(hasattr(x, "shape") for x in leaves):
    return _text(value)
  shapes = [f"{tuple(x.shape)}:{np.dtype(x.dtype).name}" if hasattr(x, "shape") else _text(x)
            for x in leaves]
  return f"{treedef} [{', '.join(shapes)}]"


def _digest(text: str) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(text.encode()).digest()[:4 * _HASH_WORDS], dtype=np.uint32)


def _tracing(config: Mapping[str, Any]) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(dict(config)))


def check_same(config: Mapping[str, Any], what: str = "configuration") -> None:
  """Raises if ``config`` differs between processes (a no-op with one process).

  Every process must call this with the same keys at the same point of the program: it runs one
  all-gather of a fixed-size hash per key. Values are compared by a canonical text: plain values
  by ``repr``, arrays and pytrees by structure, shapes and dtypes (not by contents). Under a
  trace (e.g. ``jax.eval_shape(trainer.init, params)``) no collective can run on the host, so the
  check is skipped; the concrete call checks.

  Args:
    config: name -> value, e.g. ``{"num_subdomains": 4, "params": params}``.
    what: a word for the error message.

  Raises:
    ValueError: naming each differing key, this process's value and the processes that disagree.
  """
  if jax.process_count() == 1 or _tracing(config):
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  keys = sorted(config)
  local = np.zeros((len(keys) + 1, _HASH_WORDS), np.uint32)
  local[0] = _digest(repr(keys))
  texts = {k: _describe(config[k]) for k in keys}
  for row, key in enumerate(keys, start=1):
    local[row] = _digest(texts[key])
  gathered = np.asarray(multihost_utils.process_allgather(local))
  if (gathered == gathered[0]).all():
    return
  if (gathered[:, 0] != gathered[0, 0]).any():
    raise ValueError(f"the {what} differs between processes: they check different keys "
                     f"(this is process {jax.process_index()}, keys {keys})")
  problems = []
  for row, key in enumerate(keys, start=1):
    differ = [p for p in range(gathered.shape[0]) if (gathered[p, row] != gathered[0, row]).any()]
    if differ:
      problems.append(f"{key} (process {jax.process_index()} has {texts[key]}; processes "
                      f"{differ} differ from process 0)")
  raise ValueError(f"the {what} differs between processes: " + "; ".join(problems))
