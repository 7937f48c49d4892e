"""Subprocess jobs that run beside the in-process tests.

The in-process tests keep about one CPU core busy (XLA compiles one program at a time). The
subprocess runs (example scripts, benchmark quick modes, multi-process launches, the docs build,
the golden recording) need no state of the test process, so they start when the session starts,
in one background thread, and use the other core; the tests that read them run last
(tests/conftest.py) and wait for their results.

A test module registers a job with ``@job(name, *needed_by)``: ``needed_by`` are node-id prefixes
of the tests that read it (``"tests/examples/test_run.py::test_example_runs[pmap.py]"``); only
the jobs some selected test needs are started (``start``). ``result(name)`` waits for a job (and
runs it at once when it was not started, e.g. under ``pytest --collect-only`` followed by a
single test). Every job runs its subprocesses through ``run``, which the session's end stops.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

_JOBS: dict[str, tuple[tuple[str, ...], Callable[[], Any]]] = {}
_FUTURES: dict[str, Future] = {}
_RUNNING: set[subprocess.Popen] = set()
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"pool": None, "stopped": False, "tmp": None}


def job(name: str, *needed_by: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
  """Registers ``fn`` as the job ``name``, needed by the tests whose node ids start with one of
  ``needed_by``."""
  def register(fn: Callable[[], Any]) -> Callable[[], Any]:
    _JOBS[name] = (needed_by, fn)
    return fn
  return register


def needs(nodeid: str) -> list[str]:
  """The jobs the test ``nodeid`` reads."""
  return [name for name, (prefixes, _) in _JOBS.items()
          if any(nodeid.startswith(p) for p in prefixes)]


def start(nodeids: list[str]) -> None:
  """Starts, in one background thread, every job a test of ``nodeids`` needs, in the order the
  tests will read them."""
  names = list(dict.fromkeys(name for nodeid in nodeids for name in needs(nodeid)))
  if not names:
    return
  _STATE["pool"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tests-background")
  for name in names:
    _FUTURES[name] = _STATE["pool"].submit(_JOBS[name][1])


def result(name: str) -> Any:
  """The job's return value (its exception raised here), waiting for it or running it now."""
  if name not in _FUTURES:
    future = Future()
    try:
      future.set_result(_JOBS[name][1]())
    except Exception as error:  # pylint: disable=broad-exception-caught
      future.set_exception(error)
    _FUTURES[name] = future
  return _FUTURES[name].result()


def scratch(name: str) -> Path:
  """A fresh directory for a job's outputs (removed when the session ends)."""
  with _LOCK:
    if _STATE["tmp"] is None:
      _STATE["tmp"] = Path(tempfile.mkdtemp(prefix="aptsjax-tests-"))
  return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_STATE["tmp"]))


def _kill(process: subprocess.Popen) -> None:
  """Kills the process group ``run`` started (the process and whatever it launched)."""
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run(argv: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
  """``subprocess.run(argv, capture_output=True, text=True, ...)`` in a process group of its own,
  killed (with the processes it launched) after ``timeout`` seconds or when ``stop`` is called."""
  with _LOCK:
    if _STATE["stopped"]:
      raise RuntimeError("the test session has ended")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    _RUNNING.add(process)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    _kill(process)
    stdout, stderr = process.communicate()
    stderr += f"\n[tests] killed after {timeout} s"
  finally:
    with _LOCK:
      _RUNNING.discard(process)
  return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def stop() -> None:
  """Ends the session's jobs: cancels those not started, kills running subprocesses, removes
  the scratch directories."""
  with _LOCK:
    _STATE["stopped"] = True
    for process in _RUNNING:
      _kill(process)
  if _STATE["pool"] is not None:
    _STATE["pool"].shutdown(wait=True, cancel_futures=True)
  if _STATE["tmp"] is not None:
    shutil.rmtree(_STATE["tmp"], ignore_errors=True)
