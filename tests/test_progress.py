"""Progress output in log files: whole lines, no carriage-return redraws."""

from __future__ import annotations

from pipeline import progress as progress_mod
from pipeline.progress import progress


def test_progress_in_a_log_is_one_line_per_refresh(capsys, monkeypatch) -> None:
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.0)  # every update gets its line
    assert sum(progress(range(3), desc="lut", unit="pt")) == 3
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    lines = err.splitlines()
    assert "\r" not in err and len(lines) >= 2
    assert lines[-1].startswith("lut: 100%") and "3/3" in lines[-1]


def test_disabled_progress_writes_nothing(capsys) -> None:
    assert list(progress(range(2), disable=True)) == [0, 1]
    assert capsys.readouterr().err == ""
