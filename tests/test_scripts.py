"""Benchmark and report scripts run end to end in their tiny modes (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_feature_cache_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_feature_cache.py"),
            "--tiny",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "speed-up:" in result.stdout
    report = json.loads(out.read_text())
    assert report["uncached_fit_s"] > 0 and report["cached_fit_s"] > 0
    assert abs(report["cached_val_acc"] - report["uncached_val_acc"]) <= 0.01
