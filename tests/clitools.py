"""Running the real ``transferlab`` command in tests, and reading its one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

BIN = Path(sys.executable).parent
# The cheapest real training run: digits, one epoch of four batches.
SMOKE = ["experiment=smoke", "trainer.max_epochs=1", "trainer.limit_train_batches=4"]


def transferlab(
    *args: str, cwd: Path, timeout: int = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``transferlab *args`` in ``cwd``; ``env``: variables set for it on top of ours."""
    command = [str(BIN / "transferlab"), *args]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **env} if env else None,
    )  # fmt: skip


def run_id_of(stdout: str) -> str:
    """The MLflow run id a run or an evaluation printed."""
    match = re.search(r"MLflow run: (\w+)", stdout)
    assert match, stdout[-2000:]
    return match.group(1)


def train_in(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None
) -> tuple[Path, str, subprocess.CompletedProcess]:
    """``transferlab train *args`` into ``cwd/outputs/run``, checked to succeed: (run folder,
    MLflow run id, the finished process)."""
    folder = cwd / "outputs" / "run"
    result = transferlab("train", *args, f"hydra.run.dir={folder}", cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, run_id_of(result.stdout), result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error prints, checked to be the whole of stderr."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("transferlab: error: ")
    return lines[0]


def sweep_runs(cwd: Path, experiment: str = "transferlab") -> tuple[list, list]:
    """The parent runs and the child runs of ``experiment`` in the store under ``cwd``
    (``mlruns/mlflow.db``), read back through MLflow."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [run for run in runs if run.data.tags.get("sweep.parent") == "true"]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return parents, children


def composed(tmp_path: Path, *overrides: str):
    """The train config with ``overrides``, composed as the CLI does, writing into
    ``tmp_path`` (its root and output folder)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from transferlab import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root = cfg.paths.output_dir = str(tmp_path)
    return cfg


def start_dashboard(cwd: Path) -> tuple[subprocess.Popen, str]:
    """`transferlab ui` on a free port, serving; returns the server and the link it printed
    (to the runs table, or the dashboard's root for a store without runs)."""
    import re
    import threading
    import time
    import urllib.request

    from transferlab.tracking.server import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "transferlab"), "ui", "--port", str(port)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(server.stdout), daemon=True).start()
    deadline = time.monotonic() + 90
    while True:
        link = re.search(rf"http://127\.0\.0\.1:{port}/\S*", "".join(output))
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            assert link, f"no dashboard link in: {''.join(output)}"
            return server, link.group()
        except OSError:
            assert server.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "the dashboard did not start in 90 s"
            time.sleep(0.5)
