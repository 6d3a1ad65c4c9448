"""Benchmark and report scripts run end to end in their tiny modes (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
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


def run_script(name: str, tmp_path: Path, *args: str) -> tuple[str, dict]:
    """Run ``scripts/<name>.py --tiny`` in ``tmp_path``; its stdout and its JSON report."""
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--tiny", "--out", str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


@pytest.mark.parametrize(
    "task",
    [
        "classification",
        pytest.param("detection", marks=pytest.mark.slow),  # 60 s on 2 cores
    ],
)
def test_overhead_benchmark_tiny(tmp_path: Path, task: str) -> None:
    stdout, report = run_script("bench_overhead", tmp_path, "--task", task)
    assert "vs plain_fast" in stdout and report["task"].startswith(f"{task}: ")
    for path in ("transferlab", "plain", "plain_fast"):
        assert report[f"{path}_train_img_s"] > 0 and report[f"{path}_eval_img_s"] > 0
    assert report["ratio_train_vs_plain"] > 0 and len(report["runs"]) == 1


def test_startup_benchmark_tiny(tmp_path: Path) -> None:
    stdout, report = run_script("bench_startup", tmp_path)
    assert "first training step" in stdout
    assert report["help_imports"] == []  # --help loads none of torch, timm, mlflow, ...
    assert 0 < report["help_s"] < report["first_step_s"]


def test_data_benchmark_tiny(tmp_path: Path) -> None:
    _, report = run_script("bench_data", tmp_path)
    assert set(report) == {"digits 32px", "image_folder 64px"}
    for rows in report.values():
        assert rows[0]["loader_train_img_s"] > 0 and rows[0]["model_train_img_s"] > 0


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_memory_benchmark_tiny(tmp_path: Path) -> None:
    stdout, report = run_script("bench_memory", tmp_path)
    assert "peak RSS" in stdout
    assert report["epochs"] == 4 and len(report["rss_per_epoch_mib"]) == 4
    assert report["peak_rss_mib"] >= max(report["rss_per_epoch_mib"])


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_formats_benchmark_tiny(tmp_path: Path) -> None:
    stdout, report = run_script("bench_formats", tmp_path)
    assert "channels_last_bf16" in stdout
    for phase in ("train", "inference"):
        assert report[phase]["nchw_fp32_speedup"] == 1.0
        assert report[phase]["channels_last_bf16_img_s"] > 0


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_end_to_end_benchmark_tiny(tmp_path: Path) -> None:
    stdout, report = run_script("bench_end_to_end", tmp_path)
    assert "plain / transferlab" in stdout and report["cpu"]
    (pair,) = report["runs"]
    for path in ("transferlab", "plain"):
        run = pair[path]
        assert run["wall_s"] > run["fit_s"] > 0 and run["test_s"] > 0
        assert 0.0 <= run["test_acc"] <= 1.0
    assert pair["transferlab"]["omp_wait_policy"] in ("default", "PASSIVE")
    assert report["speedup_wall_s"] > 0


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_wait_policy_benchmark_tiny(tmp_path: Path) -> None:
    stdout, report = run_script("bench_wait_policy", tmp_path)
    assert "shared cores" in stdout
    assert set(report["quiet"]) == {"default", "PASSIVE"}
    assert all(v > 0 for values in report["quiet"].values() for v in values)
    assert [row["second"].split(",")[0] for row in report["shared"][1:]] == [
        "default", "PASSIVE", "default", "PASSIVE",
    ]  # fmt: skip
    assert all(row["second_img_s"] > 0 for row in report["shared"][1:])


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_overhead_benchmark_tiny_segmentation(tmp_path: Path) -> None:
    stdout, report = run_script(
        "bench_overhead", tmp_path, "--task", "segmentation", "--batch-size", "4",
        "--eval-batch-size", "8",
    )  # fmt: skip
    assert "segmentation: fmnist_scenes" in stdout
    for path in ("transferlab", "plain", "plain_fast"):
        assert report[f"{path}_train_img_s"] > 0 and report[f"{path}_eval_img_s"] > 0


@pytest.mark.slow  # two real runs, one of them 2 DDP processes: 30 s on 2 cores
def test_ddp_benchmark_tiny(tmp_path: Path) -> None:
    stdout, report = run_script("bench_ddp", tmp_path)
    assert "efficiency" in stdout
    one, two = report["points"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["speedup"] == 1.0 and two["images_per_s"] > 0
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert two["threads_per_process"] == max(1, report["cores"] // 2)
