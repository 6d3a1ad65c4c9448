"""A team's MLflow server: ``tracking=server`` runs and sweeps through a real ``mlflow server``
on a free port of 127.0.0.1 (sqlite behind it; PostgreSQL too when installed), read back
whole through the server; ``transferlab server``; and a run whose server goes away mid-run,
which finishes here and says what was not logged."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from clitools import BIN, error_line, transferlab

from transferlab.errors import UserError
from transferlab.tracking.fallback import UNLOGGED_FILE, Fallback
from transferlab.tracking.server import (
    check_cluster_folder,
    choose_backend,
    describe_store,
    free_port,
    has_postgres_driver,
    mlflow_server,
    postgres_bin_dir,
    postgres_uri,
    team_server,
)
from transferlab.tracking.store import server_answers

TESTS = Path(__file__).resolve().parent
EPOCHS = 2
RUN = ["experiment=smoke", f"trainer.max_epochs={EPOCHS}", "trainer.limit_train_batches=4"]
POSTGRES = postgres_bin_dir() is not None and has_postgres_driver()
PASSWORD = "team-s3cret-41d"
ALLOW_FAULTS = (
    "allowed_targets=[torch.optim.*,pytorch_lightning.callbacks.*,transferlab.*,faults.*]"
)


@contextlib.contextmanager
def open_folder() -> Iterator[Path]:
    """A folder the ``postgres`` user can enter too (pytest's are private to their owner)."""
    root = Path(tempfile.mkdtemp(prefix="tl-server-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)]
)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A team server's URI: the shared one (sqlite), or one with PostgreSQL behind it."""
    if request.param == "sqlite":
        yield request.getfixturevalue("tracking_server")
        return
    assert POSTGRES, (  # `make test-slow` installs both as root
        "the PostgreSQL server tests need Debian's postgresql and psycopg2: "
        "`sudo apt-get install postgresql` and `pip install -e '.[dev]'`"
    )
    with (
        open_folder() as root,
        team_server(root, backend="postgresql", log=root / "server.log") as (running, _),
    ):
        assert running.store == postgres_uri(root / "postgres")
        yield running.url


def run_id_of(result: subprocess.CompletedProcess) -> str:
    return re.search(r"MLflow run: (\w+)", result.stdout).group(1)


def check_recorded_whole(client: mlflow.MlflowClient, run_id: str, dst: Path) -> None:
    """FINISHED, a point per epoch in each epoch history, the test and summary metrics, and
    the artifacts (checkpoint, config, figures) downloaded through the server."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    for name in ("val/acc", "val/loss", "train/loss_epoch", "train/acc"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, name))
        assert steps == list(range(EPOCHS)), (name, steps)
    assert {"test/acc", "test/loss", "best/val/acc", "time/log_model_s"} <= run.data.metrics.keys()
    local = Path(client.download_artifacts(run_id, "", str(dst / run_id)))
    assert [p.stat().st_size > 0 for p in (local / "checkpoints").glob("*.ckpt")] == [True]
    assert (local / "config" / "config.yaml").is_file()
    assert (local / "curves" / "learning_curves.png").stat().st_size > 0


def test_a_run_on_the_team_server_is_recorded_whole(server: str, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    # Credentials in MLflow's variables (this server ignores them): sent, never recorded.
    credentials = {"MLFLOW_TRACKING_USERNAME": "team-user", "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    result = transferlab(
        "train", *RUN, "tracking=server", "tracking.experiment_name=team_run",
        f"hydra.run.dir={folder}",
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": server, **credentials},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = run_id_of(result)
    assert f"Dashboard:  {server}/#/experiments/" in result.stdout
    client = mlflow.MlflowClient(server)
    check_recorded_whole(client, run_id, tmp_path / "artifacts")
    run = client.get_run(run_id)
    assert run.data.params["tracking.server"] == "True"
    recorded = [*run.data.params.values(), *run.data.tags.values(), result.stdout, result.stderr]
    assert not [text for text in recorded if PASSWORD in text]
    # The user name is the run's owner, as MLflow records it; nowhere else.
    assert [key for key, value in run.data.tags.items() if "team-user" in value] == ["mlflow.user"]
    assert not [value for value in run.data.params.values() if "team-user" in value]
    # The MLflow Model, through the server's artifact proxy. (download_artifacts's own
    # tracking_uri is not used to find a run's logged model: MLflow's global URI is.)
    mlflow.set_tracking_uri(server)
    model = mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/model", dst_path=str(tmp_path / "model")
    )
    assert (Path(model) / "MLmodel").is_file()
    assert not (folder / UNLOGGED_FILE).exists()


@pytest.mark.slow  # about 90 s on 2 cores: three jobs at once
def test_a_joblib_sweep_on_the_team_server_is_recorded_whole(server: str, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    result = transferlab(
        "train", "-m", *RUN, "seed=0,1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3",
        "tracking=server", f"tracking.uri={server}", "tracking.experiment_name=team_sweep",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((sweep_dir / "sweep_run.json").read_text())
    assert info["tracking_uri"] == server
    client = mlflow.MlflowClient(server)
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/jobs"] == 3
    children = client.search_runs(
        [info["experiment_id"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1", "2"]
    for child in children:
        check_recorded_whole(client, child.info.run_id, tmp_path / "artifacts")
    table = Path(client.download_artifacts(parent.info.run_id, "comparison.csv", str(tmp_path)))
    assert len(table.read_text().strip().splitlines()) == 1 + 3

    champion = client.get_model_version_by_alias("team_sweep", "champion")
    assert champion.run_id == parent.data.tags["sweep.best_run_id"]
    mlflow.set_tracking_uri(server)
    model = mlflow.artifacts.download_artifacts(
        "models:/team_sweep@champion", dst_path=str(tmp_path / "champion")
    )
    assert (Path(model) / "MLmodel").is_file()


def unlogged(path: Path) -> tuple[dict[str, list[int]], set[str]]:
    """What a run's ``mlflow_unlogged.jsonl`` keeps: the steps of each metric, and the rest."""
    steps: dict[str, list[int]] = {}
    rest = set()
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["what"] == "metrics":
            for name in record["values"]:
                steps.setdefault(name, []).append(record["step"])
        else:
            rest.add(record["what"])
    return steps, rest


@pytest.mark.slow  # about 70 s on 2 cores, 30 s of it MLflow's retries
def test_a_run_outlives_its_server_and_says_what_was_not_logged(tmp_path: Path) -> None:
    epochs, folder, root = 4, tmp_path / "run", tmp_path / "server"
    root.mkdir()
    store = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_server(store, root / "artifacts", log=root / "server.log") as running:
        port = int(running.url.rsplit(":", 1)[1])
        started = time.monotonic()
        result = transferlab(
            "train", "experiment=smoke", f"trainer.max_epochs={epochs}",
            "trainer.limit_train_batches=2", "tracking=server", f"tracking.uri={running.url}",
            "tracking.experiment_name=team_lost", f"hydra.run.dir={folder}",
            # The server is killed when epoch 1 starts: epoch 0 is logged, the rest is not.
            ALLOW_FAULTS, "+callbacks.fault._target_=faults.StopServer",
            "+callbacks.fault.epoch=1", f"+callbacks.fault.pgid={running.process.pid}",
            f"+callbacks.fault.port={port}",
            cwd=tmp_path, timeout=600,
            env={"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
        )  # fmt: skip
        seconds = time.monotonic() - started

    # It trained and tested to the end, and exits 1: its record is incomplete.
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Test metrics and timings:" in result.stdout
    unlogged_file = folder / UNLOGGED_FILE
    lines = result.stderr.strip().splitlines()
    warning = f"transferlab: warning: the MLflow server {running.url} stopped answering; "
    assert sum(line.startswith(warning) for line in lines) == 1, result.stderr[-3000:]
    last = lines[-1]
    assert last.startswith(f"transferlab: error: the MLflow server {running.url} went away"), last
    assert last.endswith(f": see {unlogged_file}"), last
    assert "val/acc, val/f1" in last and "test/acc" in last
    assert seconds < 240, seconds  # MLflow alone retries for about 4 minutes per request

    # What the server got and what the run kept add up to every epoch, once.
    kept, rest = unlogged(unlogged_file)
    (checkpoint,) = folder.glob("checkpoints/best-*.ckpt")
    assert {"the MLflow Model", f"the artifact checkpoints/{checkpoint.name}"} <= rest
    assert "the status FINISHED" in rest
    with mlflow_server(store, root / "artifacts", log=root / "again.log") as again:
        client = mlflow.MlflowClient(again.url)
        run = client.get_run(run_id_of(result))
        for name in ("val/acc", "val/loss", "train/loss_epoch"):
            logged = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert logged == [0], (name, logged)
            assert sorted(logged + kept[name]) == list(range(epochs)), (name, kept[name])
        assert "test/acc" not in run.data.metrics and len(kept["test/acc"]) == 1
        assert run.info.status == "RUNNING"  # nobody could tell the server it ended
    assert f"without logging {sum(map(len, kept.values()))} values of {len(kept)} metrics" in last


@pytest.mark.slow  # about 40 s on 2 cores: PostgreSQL (when installed) and the server start
def test_transferlab_server_starts_prints_its_uri_and_stops_on_ctrl_c() -> None:
    port = free_port()
    with open_folder() as root:
        process = subprocess.Popen(
            [str(BIN / "transferlab"), "server", "--port", str(port), "--root", str(root)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        shown = []
        try:
            for line in process.stdout:
                shown.append(line)
                if line.startswith("Ctrl+C stops it."):
                    break
            banner = "".join(shown)
            assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in banner, banner
            assert server_answers(f"http://127.0.0.1:{port}")
            backend = "PostgreSQL" if POSTGRES else "sqlite"
            assert f"runs and models: {backend}" in banner
            assert f"artifacts:       {root / 'artifacts'}" in banner
        finally:
            process.send_signal(signal.SIGINT)
            rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, rest[-3000:]
        assert rest.strip().endswith("MLflow server stopped.")
        assert not server_answers(f"http://127.0.0.1:{port}", timeout=1)
        assert not (root / "postgres" / "postmaster.pid").exists()  # PostgreSQL stopped too
        started = re.search(r"started in ([\d.]+) s", banner).group(1)
        print(f"transferlab server ({backend}) started in {started} s")


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = transferlab("server", "--port", str(port), "--root", str(tmp_path), cwd=tmp_path)
    assert f"port {port} of 127.0.0.1 is in use" in error_line(result)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (None, "tracking=server needs the server's URI: set MLFLOW_TRACKING_URI"),
        ("sqlite:////tmp/x.db", "tracking=server needs an http(s):// URI, not sqlite:////tmp/x.db"),
    ],
)
def test_tracking_server_without_a_server_is_one_line(
    tmp_path: Path, uri: str | None, expected: str
) -> None:
    overrides = ["tracking=server", *([f"tracking.uri={uri}"] if uri else [])]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [str(BIN / "transferlab"), "train", *RUN, *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert expected in error_line(result)


def test_the_backend_is_postgresql_when_installed_else_sqlite(tmp_path: Path) -> None:
    bin_dir = tmp_path / "15" / "bin"
    assert choose_backend("auto", bin_dir, driver=True)[0] == "postgresql"
    assert choose_backend("postgresql", bin_dir, driver=True)[0] == "postgresql"
    assert choose_backend("sqlite", bin_dir, driver=True) == ("sqlite", "asked for")
    kind, why = choose_backend("auto", None, driver=True)
    assert kind == "sqlite" and "apt-get install postgresql" in why
    kind, why = choose_backend("auto", bin_dir, driver=False)
    assert kind == "sqlite" and "transferlab[server]" in why
    with pytest.raises(UserError, match="PostgreSQL is not installed"):
        choose_backend("postgresql", None, driver=True)
    with pytest.raises(UserError, match="psycopg2 is missing"):
        choose_backend("postgresql", bin_dir, driver=False)
    with pytest.raises(UserError, match="choose one of auto, postgresql, sqlite"):
        choose_backend("mysql", bin_dir, driver=True)


def test_the_newest_complete_postgresql_is_found(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*" / "bin")
    assert postgres_bin_dir(pattern) is None
    for version, names in (("9.6", ["initdb", "pg_ctl"]), ("13", ["initdb", "pg_ctl"]),
                           ("16", ["initdb"])):  # fmt: skip
        (tmp_path / version / "bin").mkdir(parents=True)
        for name in names:
            (tmp_path / version / "bin" / name).touch()
    assert postgres_bin_dir(pattern) == tmp_path / "13" / "bin"  # 16 has no pg_ctl


def test_a_cluster_folder_postgresql_cannot_use_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="too long a path for PostgreSQL's socket"):
        check_cluster_folder(Path("/tmp") / ("x" * 100), None)
    if os.geteuid() != 0 or not POSTGRES:
        return
    folder = tmp_path / "postgres"  # pytest's folders are private to root
    folder.mkdir()
    shutil.chown(folder, "postgres", "postgres")
    with pytest.raises(
        UserError, match=re.escape("the 'postgres' user (PostgreSQL refuses root) cannot")
    ):
        check_cluster_folder(folder, "postgres")


def test_stores_are_described_in_words(tmp_path: Path) -> None:
    assert describe_store(postgres_uri(tmp_path)) == (
        f"PostgreSQL, database 'mlflow' of the cluster in {tmp_path} (unix socket only)"
    )
    assert describe_store(f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite, {tmp_path}/mlflow.db"


def test_once_the_server_is_gone_a_run_keeps_what_it_sends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    fallback = Fallback(uri, tmp_path)
    calls = []

    def refused() -> None:
        calls.append(1)
        raise ConnectionError("Connection refused")

    assert fallback.send("metrics", refused, {"step": 0, "values": {"val/acc": 0.5}}) is None
    assert fallback.send("metrics", refused, {"step": 1, "values": {"val/acc": 0.6}}) is None
    assert fallback.send("the artifact checkpoints/best.ckpt", refused, {"path": "x"}) is None
    assert calls == [1]  # given up at the first failure: no more waiting on retries
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning == (
        f"transferlab: warning: the MLflow server {uri} stopped answering; the run goes on "
        f"without it and keeps what it could not log in {tmp_path / UNLOGGED_FILE} "
        "(ConnectionError: Connection refused)"
    )
    assert unlogged(tmp_path / UNLOGGED_FILE) == (
        {"val/acc": [0, 1]},
        {"the artifact checkpoints/best.ckpt"},
    )
    assert fallback.summary() == (
        f"the MLflow server {uri} went away during the run; the run finished here without "
        "logging 2 values of 1 metric (val/acc) and the artifact checkpoints/best.ckpt: see "
        f"{tmp_path / UNLOGGED_FILE}"
    )


def test_other_errors_are_raised_as_before(tracking_server: str, tmp_path: Path) -> None:
    def bug() -> None:
        raise ValueError("a bug")

    for uri in (tracking_server, f"sqlite:///{tmp_path / 'mlflow.db'}"):  # it answers; a file
        fallback = Fallback(uri, tmp_path)
        with pytest.raises(ValueError, match="a bug"):
            fallback.send("metrics", bug, {"step": 0, "values": {"a": 1.0}})
        assert fallback.lost is None
    assert not (tmp_path / UNLOGGED_FILE).exists()


def test_a_sweep_whose_server_is_gone_ends_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from omegaconf import OmegaConf

    from transferlab.sweeps import MlflowSweepCallback

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once
    callback = MlflowSweepCallback()
    callback.tracking_uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    callback.parent_run_id = "0" * 32
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path)}}, "tracking": {"registered_model": "m"}}
    )
    with pytest.raises(SystemExit) as stop:
        callback.on_multirun_end(config)
    assert stop.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"transferlab: error: the MLflow server {callback.tracking_uri} went away: the sweep's "
        f"parent run {'0' * 32} was neither compared nor ended; each job's outputs are in "
        f"{tmp_path}"
    ]
