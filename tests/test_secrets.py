"""Credentials never reach what a run records or prints: a real MLflow server, reached with
``http://user:password@host`` from the environment and as an override.

The server has no authentication, so it ignores the user info; every param, tag, artifact,
file of the run's folder and line of output is searched for the password.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from transferlab.tracking import provenance
from transferlab.tracking.redact import MASK, redact_text, redact_uri, secret_values

BIN = Path(sys.executable).parent
CHEAP = ["experiment=smoke", "trainer.max_epochs=1", "trainer.limit_train_batches=4"]
PASSWORD = "s3cret-7f2c"


def with_password(uri: str) -> str:
    return uri.replace("http://", f"http://user:{PASSWORD}@")


def transferlab(*args: str, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    return subprocess.run(
        [str(BIN / "transferlab"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def files_holding_the_password(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]


def runs_holding_the_password(client: mlflow.MlflowClient, experiment: str, dst: Path) -> list:
    """Every param and tag of the experiment's runs, and every artifact, downloaded."""
    found = []
    (experiment_id,) = [
        e.experiment_id for e in client.search_experiments() if e.name == experiment
    ]
    runs = client.search_runs([experiment_id])
    assert runs
    for run in runs:
        values = {**run.data.params, **run.data.tags}
        found += [f"{run.info.run_id} {key}" for key, value in values.items() if PASSWORD in value]
        local = Path(client.download_artifacts(run.info.run_id, "", str(dst / run.info.run_id)))
        found += files_holding_the_password(local)
    return found


def test_no_password_in_what_a_run_records_or_prints(tracking_server: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    overrides = [
        *CHEAP, "tracking.experiment_name=secrets", f"hydra.run.dir={out}",
        f"tracking.uri={with_password(tracking_server)}",
        "+note=${oc.env:MLFLOW_TRACKING_PASSWORD}",  # a credential resolved into the config
    ]  # fmt: skip
    result = transferlab("train", *overrides, cwd=tmp_path, uri=with_password(tracking_server))
    assert result.returncode == 0, result.stderr[-3000:]
    assert PASSWORD not in result.stdout + result.stderr
    assert f"store {tracking_server})" in result.stdout

    client = mlflow.MlflowClient(tracking_server)
    assert runs_holding_the_password(client, "secrets", tmp_path / "artifacts") == []
    assert files_holding_the_password(out) == []
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    run = client.get_run(run_id)
    assert run.data.params["tracking.uri"] == tracking_server and run.data.params["note"] == MASK
    config_files = {a.path for a in client.list_artifacts(run_id, "config")}
    assert {"config/overrides.yaml", "config/config.yaml"} <= config_files

    # The command pastes into a shell as it is (here with --cfg job: compose, do not run).
    command = run.data.tags["command"]
    assert shlex.split(command) == [
        "transferlab", "train", *overrides[:-2], f"tracking.uri={tracking_server}", overrides[-1]
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    again = subprocess.run(
        ["bash", "-c", f"{command} --cfg job"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"uri: {tracking_server}" in again.stdout
        and "note: ${oc.env:MLFLOW_TRACKING_PASSWORD}" in again.stdout
    )


@pytest.mark.slow  # 17 s on 2 cores: `make test-slow` runs it
def test_a_sweep_keeps_the_password_out_and_compare_finds_its_store(
    tracking_server: str, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "multirun"
    result = transferlab(
        "train", "-m", *CHEAP, "seed=0", "tracking.experiment_name=secret_sweep",
        f"hydra.sweep.dir={sweep_dir}", f"tracking.uri={with_password(tracking_server)}",
        cwd=tmp_path, uri=with_password(tracking_server),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert PASSWORD not in result.stdout + result.stderr
    info = json.loads((sweep_dir / "sweep_run.json").read_text())
    assert info["tracking_uri"] == tracking_server
    assert files_holding_the_password(sweep_dir) == []
    client = mlflow.MlflowClient(tracking_server)
    assert runs_holding_the_password(client, "secret_sweep", tmp_path / "artifacts") == []
    child = client.search_runs(
        [info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'"
    )[0]
    assert shlex.split(child.data.tags["command"])[:2] == ["transferlab", "train"]
    assert "-m" not in shlex.split(child.data.tags["command"])  # this job alone

    # The sweep file names the store without credentials; compare takes them from the
    # environment when MLFLOW_TRACKING_URI is the same store.
    report = transferlab(
        "compare", str(sweep_dir), cwd=tmp_path, uri=with_password(tracking_server)
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert child.info.run_id[:8] in report.stdout
    assert PASSWORD not in report.stdout + report.stderr


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://user:pw@host:5000/prefix?token=abc#x", "http://host:5000/prefix"),
        ("https://token@host", "https://host"),
        ("postgresql://u:p@db.example:5432/mlflow?sslmode=require", "postgresql://db.example:5432/mlflow"),
        ("sqlite:////abs/mlflow.db?mode=ro", "sqlite:////abs/mlflow.db"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("http://host:5000", "http://host:5000"),
        ("not a uri", "not a uri"),
    ],
)  # fmt: skip
def test_redact_uri_drops_user_info_and_query(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_redact_text_masks_uris_and_credential_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-key-123456")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-abcdefgh")  # named like a secret
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # too short to be one
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://me:uri-pass-99@h:1")
    text = (
        "- tracking.uri=http://me:uri-pass-99@h:1\n"
        "key: aws-key-123456, token tok-abcdefgh, again uri-pass-99\n"
        "dirname: tracking.uri=http://a:b@h:1,seed=1 'https://x/y?sig=zz'\n"
        "#0 : tracking.uri=http\\://a\\:b@h\\:1 seed=0\n"  # as Hydra logs a sweep job
    )
    assert redact_text(text) == (
        "- tracking.uri=http://h:1\n"
        f"key: {MASK}, token {MASK}, again {MASK}\n"
        "dirname: tracking.uri=http://h:1,seed=1 'https://x/y'\n"
        "#0 : tracking.uri=http\\://h\\:1 seed=0\n"
    )
    assert "1" not in secret_values()


def test_the_command_is_the_same_for_python_dash_m(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        sys,
        "argv",
        ["/venv/lib/transferlab/train.py", "seed=1", "+n=${oc.env:X}", "tracking.uri=http://u:p@h"],
    )
    assert provenance.command_line() == (
        "transferlab train seed=1 '+n=${oc.env:X}' tracking.uri=http://h"
    )
    assert provenance.command_line(["data=digits", "lr=1e-3"]) == (
        "transferlab train data=digits lr=1e-3"
    )
