"""Progress bars on a terminal only: never in logs, pipes or CI; the log lines stay."""

from __future__ import annotations

import io
import sys

from koala_jax import console


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_and_lines_above_it(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("KOALA_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", Terminal())
    with console.Progress(3, "training") as bar:
        assert bar._bar is not None
        bar.update(2)
        console.info("step 2/3 | a log line")
    assert "training" in sys.stderr.getvalue() and "2/3" in sys.stderr.getvalue()
    assert sys.stdout.getvalue() == "step 2/3 | a log line\n"


def test_no_bar_in_a_pipe_or_in_ci(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert console.Progress(3, "training")._bar is None
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setenv("CI", "true")
    assert console.Progress(3, "training")._bar is None
