"""Progress bars only on a terminal: redirected, a benchmark writes no carriage returns, only
one line per finished stage (benchmarks.common.progress)."""
import io
import sys

import pytest

from benchmarks.common import progress


class Terminal(io.StringIO):
  """A stream that says it is a terminal."""

  def isatty(self) -> bool:
    return True


def redirect(monkeypatch, stderr: io.StringIO) -> io.StringIO:
  """Sends stderr to ``stderr`` and stdout to a new StringIO, which it returns."""
  stdout = io.StringIO()
  monkeypatch.setattr(sys, "stdout", stdout)
  monkeypatch.setattr(sys, "stderr", stderr)
  return stdout


def run_stages(monkeypatch, stderr: io.StringIO) -> tuple[str, str]:
  """Two runs of three epochs under an overall bar; returns (stdout, stderr)."""
  stdout = redirect(monkeypatch, stderr)
  bars = progress.Progress(6.0, desc="all methods")
  for run in ("A", "B"):
    bar = bars.run(3, f"{run} seed 0")
    for _ in range(3):
      bar.set_postfix_str("loss 1.0")
      bar.update(1)
      bars.advance(1.0)
    bar.close()
  bars.close()
  return stdout.getvalue(), stderr.getvalue()


def test_no_carriage_returns_without_a_terminal(monkeypatch):
  out, err = run_stages(monkeypatch, io.StringIO())
  assert "\r" not in out + err
  assert err == ""
  # one line when the plan is done (the runs log their own line each)
  assert len(out.splitlines()) == 1
  assert out.startswith("all methods: 100% of the planned work done in ")


def test_bars_on_a_terminal_go_to_stderr(monkeypatch):
  pytest.importorskip("tqdm")
  out, err = run_stages(monkeypatch, Terminal())
  assert out == ""
  assert "\r" in err and "all methods: 100%" in err


@pytest.mark.parametrize("terminal", [False, True])
def test_a_tracked_loop_draws_only_on_a_terminal(monkeypatch, terminal):
  stderr = Terminal() if terminal else io.StringIO()
  stdout = redirect(monkeypatch, stderr)
  assert list(progress.track([1, 2, 3], "configurations")) == [1, 2, 3]
  if terminal:
    assert "configurations: 100%" in stderr.getvalue() and stdout.getvalue() == ""
  else:
    assert "\r" not in stdout.getvalue() + stderr.getvalue()
    assert stdout.getvalue().startswith("configurations: 3 done in ")
    assert len(stdout.getvalue().splitlines()) == 1
