"""Parallel jobs logging into one run store lose no metric point (scripts/soak_tracking.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def soak(tmp_path: Path, backends: str) -> tuple[str, list[dict]]:
    """Two jobs of ten steps each against ``backends``; the printed table and the JSON rows."""
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "soak_tracking.py"),
            "--jobs", "2", "--steps", "10", "--backends", backends, "--out", str(out),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())["runs"]


def check_nothing_lost(row: dict) -> None:
    assert row["points_expected"] == 2 * 10 * 3
    assert row["lost"] == 0 and row["points_found"] == row["points_expected"], row
    assert row["duplicates"] == 0 and row["wrong_values"] == 0, row
    assert row["failed_runs"] == 0 and row["job_errors"] == [], row


@pytest.mark.slow  # 17 s on 2 cores; test_sweeps covers parallel jobs by default
def test_parallel_jobs_lose_no_point_in_the_sqlite_store(tmp_path: Path) -> None:
    stdout, rows = soak(tmp_path, "sqlite")
    assert "| sqlite | 2 | 10 | 60 | 60 | 0 | 0 | 0 |" in stdout
    (row,) = rows
    check_nothing_lost(row)


@pytest.mark.slow  # starts a tracking server: about a minute on 2 busy cores
def test_parallel_jobs_lose_no_point_through_a_tracking_server(tmp_path: Path) -> None:
    _, rows = soak(tmp_path, "server")
    (row,) = rows
    assert row["backend"] == "server"
    check_nothing_lost(row)
    assert row["server_error_lines"] == []
