"""What a person reads in MLflow: one learning rate per distinct rate, epoch-level metrics
against the epoch, no float32 noise (the end-to-end check is in test_cli.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transferlab.callbacks import distinct_rates
from transferlab.optim import param_groups
from transferlab.tracking.run import readable


def groups(frozen: set[str], stage_mults: list[float]) -> list[dict]:
    """The optimizer's groups of a head and one backbone layer per stage, at lr 1e-3."""
    parts = {"head": (nn.Linear(4, 2), 1.0)}
    for i, mult in enumerate(stage_mults):
        parts[f"backbone.{i}"] = (nn.Linear(4, 4), mult)
    built = param_groups(parts)
    for group in built:
        group["lr"] = 1e-3 * group["lr_mult"]
        if group["name"].removesuffix("_no_decay") in frozen:
            for param in group["params"]:
                param.requires_grad_(False)
    return built


def test_one_rate_per_distinct_rate_and_none_for_frozen_groups() -> None:
    assert distinct_rates(groups(set(), [0.3, 0.3, 0.3])) == pytest.approx(
        {"head": 1e-3, "backbone": 3e-4}
    )
    frozen = {"backbone.0", "backbone.1", "backbone.2"}  # a linear probe
    assert distinct_rates(groups(frozen, [0.3, 0.3, 0.3])) == pytest.approx({"head": 1e-3})
    decayed = distinct_rates(groups({"backbone.0"}, [0.1, 0.2, 0.3]))  # layer decay
    assert decayed == pytest.approx({"head": 1e-3, "backbone.1": 2e-4, "backbone.2": 3e-4})


def test_readable_values_drop_float32_noise_only() -> None:
    noisy = float(torch.tensor(0.8562, dtype=torch.float32))
    assert noisy != 0.8562 and readable(noisy) == 0.8562
    assert readable(1e-12) == 1e-12 and readable(12) == 12.0
    assert readable(0.123456789) == 0.1234568
    assert math.isnan(readable(float("nan"))) and readable(float("inf")) == math.inf


def comparison_row(run_id: str, status: str, value: float, error: str = "") -> dict:
    return {"run_id": run_id, "overrides": f"x={run_id}", "status": status,
            "best val/acc": value, "test/acc": value, "error": error}  # fmt: skip


def test_the_table_shortens_errors_and_the_csv_keeps_them(tmp_path) -> None:
    from transferlab.reports.comparison import ERROR_CHARS, Comparison, markdown, write_csv

    error = "UserError: " + "x" * 300 + " | more\nTraceback line two"
    rows = [comparison_row("a", "FINISHED", 0.5), comparison_row("b", "FAILED", 0.1, error)]
    comparison = Comparison("t", "val/acc", "max", rows)
    table = markdown(comparison)
    failed = table.splitlines()[3]
    assert failed.count("|") == table.splitlines()[0].count("|")  # no column added by the text
    assert "Traceback" not in table and failed.rstrip(" |").endswith("…")
    assert max(len(cell.strip()) for cell in failed.split("|")) == ERROR_CHARS
    write_csv(comparison, tmp_path / "c.csv")
    assert "Traceback line two" in (tmp_path / "c.csv").read_text()


def test_the_chart_title_is_wrapped_inside_the_figure() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from transferlab.reports.comparison import Comparison, chart

    title = "sweep experiment=smoke " + " ".join(f"optimizer.lr=1e-{i},3e-{i}" for i in range(9))
    rows = [comparison_row("a", "FINISHED", 0.5), comparison_row("b", "FINISHED", 0.6)]
    figure = chart(Comparison(title, "val/acc", "max", rows))
    figure.canvas.draw()
    box = figure._suptitle.get_window_extent()
    assert figure._suptitle.get_text().count("\n") >= 1
    assert box.x0 >= 0 and box.x1 <= figure.bbox.x1 and box.y1 <= figure.bbox.y1


def test_names_write_numbers_short_and_groups_as_their_choice() -> None:
    from transferlab.tracking.record import compact, short_override

    assert [compact(v) for v in ("0.001", "1e-3", "0.0003", "1000000000000.0", "0.30", "5")] == [
        "1e-3",
        "1e-3",
        "3e-4",
        "1e12",
        "0.3",
        "5",
    ]
    assert compact("resnet50") == "resnet50" and compact("0") == "0"
    assert short_override("optimizer.lr", "0.001") == "lr=1e-3"
    assert short_override("finetune", "linear_probe") == "linear_probe"
    assert short_override("+trainer.limit_train_batches", "4") == "limit_train_batches=4"
