"""Starts a multi-process JAX run on this machine, for trying multi-host code on one host.

    python -m aptsjax.parallel.launch --num-processes 2 --devices-per-process 2 -- python -m benchmarks.paper

starts ``--num-processes`` copies of the command with the coordinator on a free localhost port and
the variables that :func:`aptsjax.distributed.initialize` reads (``APTSJAX_COORDINATOR``,
``APTSJAX_NUM_PROCESSES``, ``APTSJAX_PROCESS_ID``). On CPU each process gets
``--devices-per-process`` host devices (``--xla_force_host_platform_device_count``, appended to
``XLA_FLAGS``); with ``--platform gpu`` each gets that many local GPUs
(``APTSJAX_LOCAL_DEVICE_IDS``). Output lines are prefixed with ``[process i]``. If a process fails,
the others are stopped after ``--grace`` seconds, and the exit code is the first failure's.

On a real cluster no launcher is needed: SLURM (``srun``), Open MPI or a TPU pod start the
processes and ``aptsjax.distributed.initialize(auto=True)`` lets JAX read their configuration.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from aptsjax.parallel import distributed


def free_port() -> int:
  """A TCP port on localhost that is free right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, port: int,
                devices_per_process: int, platform: str) -> dict[str, str]:
  """The environment of one launched process.

  Args:
    base: the environment to extend (usually ``os.environ``).
    process_id: i in [0, num_processes).
    num_processes: the number of processes.
    port: the coordinator's port on 127.0.0.1.
    devices_per_process: devices each process uses.
    platform: "cpu" (host devices) or "gpu" (local GPUs, one disjoint set per process).

  Returns:
    A new dict.
  """
  env = dict(base)
  env[distributed.ENV_COORDINATOR] = f"127.0.0.1:{port}"
  env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
  env[distributed.ENV_PROCESS_ID] = str(process_id)
  env["PYTHONUNBUFFERED"] = "1"
  if platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
  else:
    first = process_id * devices_per_process
    env[distributed.ENV_LOCAL_DEVICE_IDS] = ",".join(
        str(first + j) for j in range(devices_per_process))
  return env


def _relay(stream, prefix: str, sink) -> None:
  for line in iter(stream.readline, b""):
    sink.write(prefix + line.decode(errors="replace"))
    sink.flush()
  stream.close()


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int = 1,
           platform: str = "cpu", port: int | None = None, grace: float = 10.0,
           timeout: float | None = None) -> int:
  """Runs ``command`` as ``num_processes`` JAX processes on localhost.

  Args:
    command: the program and its arguments.
    num_processes: processes to start (>= 1).
    devices_per_process: devices per process (>= 1).
    platform: "cpu" or "gpu".
    port: the coordinator port (default: a free one).
    grace: seconds the others may run on after one process fails.
    timeout: stop every process after this many seconds (default: none).

  Returns:
    0 if every process exited with 0, else the first non-zero exit code (124 on timeout,
    128 + k for a process killed by signal k).
  """
  if not command:
    raise ValueError("no command given (put it after --)")
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError("--num-processes and --devices-per-process must be >= 1")
  if platform not in ("cpu", "gpu"):
    raise ValueError(f"platform must be 'cpu' or 'gpu', got {platform!r}")
  port = port or free_port()
  procs, relays = [], []
  for i in range(num_processes):
    env = process_env(os.environ, process_id=i, num_processes=num_processes, port=port,
                      devices_per_process=devices_per_process, platform=platform)
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    procs.append(proc)
    relay = threading.Thread(target=_relay, args=(proc.stdout, f"[process {i}] ", sys.stdout),
                             daemon=True)
    relay.start()
    relays.append(relay)
  start, failed_at, first_failure = time.monotonic(), None, 0
  while any(p.poll() is None for p in procs):
    codes = [p.poll() for p in procs]
    bad = [c for c in codes if c not in (None, 0)]
    if bad and failed_at is None:
      failed_at, first_failure = time.monotonic(), bad[0]
    overdue = timeout is not None and time.monotonic() - start > timeout
    if overdue or (failed_at is not None and time.monotonic() - failed_at > grace):
      first_failure = first_failure or 124
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGTERM)
      deadline = time.monotonic() + 5.0
      for p in procs:
        try:
          p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
          p.kill()
      break
    time.sleep(0.05)
  for p in procs:
    p.wait()
  for relay in relays:
    relay.join(timeout=5.0)
  code = first_failure or next((p.returncode for p in procs if p.returncode), 0)
  return 128 - code if code < 0 else code  # killed by signal k: 128 + k, as a shell reports it


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  command: list[str] = []
  if "--" in argv:
    split = argv.index("--")
    argv, command = argv[:split], argv[split + 1:]
  p = argparse.ArgumentParser(prog="python -m aptsjax.parallel.launch",
                              description=__doc__.split("\n")[0],
                              epilog="usage: python -m aptsjax.parallel.launch [options] -- command ...")
  p.add_argument("--num-processes", type=int, default=2)
  p.add_argument("--devices-per-process", type=int, default=1)
  p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  p.add_argument("--grace", type=float, default=10.0,
                 help="seconds the other processes may run after one fails")
  p.add_argument("--timeout", type=float, default=None, help="stop everything after this many s")
  args = p.parse_args(argv)
  if not command:
    p.error("give the command to run after --")
  return launch(command, num_processes=args.num_processes,
                devices_per_process=args.devices_per_process, platform=args.platform,
                port=args.port, grace=args.grace, timeout=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
