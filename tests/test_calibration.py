"""Calibration (ECE, temperature scaling, reliability diagram) and the learning curves."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from transferlab.reports.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)

BIN = Path(sys.executable).parent
SMOKE = ["experiment=smoke", "trainer.max_epochs=2", "trainer.limit_train_batches=4"]


def test_ece_of_a_hand_made_example() -> None:
    # Four images, each alone in its confidence bin: ECE = mean |correct - confidence|.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    target = torch.tensor([0, 1, 1, 1])  # the second is wrong
    expected = (0.1 + 0.6 + 0.3 + 0.2) / 4
    assert expected_calibration_error(probs, target) == pytest.approx(expected, abs=1e-6)
    bins = [row for row in reliability_bins(probs, target) if row["count"]]
    assert [row["count"] for row in bins] == [1, 1, 1, 1]
    assert [row["correct"] for row in bins] == [0, 1, 1, 1]  # ordered by confidence
    gaps = sum(abs(r["accuracy"] - r["confidence"]) * r["count"] for r in bins) / 4
    assert gaps == pytest.approx(expected, abs=1e-6)


def test_temperature_scaling_lowers_nll_and_keeps_the_argmax() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (600,), generator=generator)
    logits = torch.randn(600, 5, generator=generator)
    logits[torch.arange(600), target] += 1.0  # about 60 % right...
    overconfident = 6.0 * logits  # ...with near-certain confidence
    temperature = fit_temperature(overconfident, target)
    assert temperature > 2.0  # it softens: close to the 6 put in
    nll = torch.nn.functional.cross_entropy
    assert nll(overconfident / temperature, target) < 0.5 * nll(overconfident, target)
    for t in (temperature, 2.0, 0.5):  # any T > 0 keeps every prediction
        assert torch.equal((overconfident / t).argmax(1), overconfident.argmax(1))
    before = expected_calibration_error(overconfident.softmax(1), target)
    after = expected_calibration_error((overconfident / temperature).softmax(1), target)
    assert after < before / 2


def test_calibrated_run_records_ece_temperature_curves_and_diagram(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "transferlab"), "train", *SMOKE, "calibrate=true",
         f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    metrics = client.get_run(run_id).data.metrics
    assert 0.0 <= metrics["test/ece"] <= 1.0 and 0.0 <= metrics["test/ece_uncalibrated"] <= 1.0
    assert metrics["calibration/temperature"] > 0.0
    files = {a.path for a in client.list_artifacts(run_id, "test")}
    files |= {a.path for a in client.list_artifacts(run_id, "curves")}
    assert {"test/reliability.png", "test/reliability.csv", "curves/learning_curves.png"} <= files

    local = client.download_artifacts(run_id, "test/reliability.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    by_scaling: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_scaling.setdefault(row["scaling"], []).append(row)
    assert set(by_scaling) == {"uncalibrated", "temperature-scaled"}
    for scaling, bins in by_scaling.items():
        assert len(bins) == 15
        images = sum(int(r["count"]) for r in bins)
        accuracy = sum(int(r["correct"]) for r in bins) / images
        # Scaling the logits keeps every prediction: the accuracy is the logged test/acc.
        assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6), scaling
