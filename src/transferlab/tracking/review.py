"""The dashboard link for reviewing runs: one experiment's runs table in MLflow's
model-training view, with the monitored metric and the test metrics as columns.

The runs table's columns are not URL parameters in MLflow's frontend (read in 3.17.2): it
keeps them in the browser's localStorage, or reads them from a shared view, an experiment
tag ``mlflow.sharedViewState.<key>`` that a link names with ``viewStateShareKey=<key>``
(what the dashboard's "Views" menu writes). The link's view is such a tag, rewritten each
time. MLflow leaves out the expanded rows of a shared view, so sweeps start collapsed.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from transferlab.errors import UserError

VIEW_KEY = "transferlab-review"
VIEW_NAME = "transferlab review"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# Without it MLflow may open the GenAI pages (traces, judges) instead of the runs table.
TRAINING_VIEW = "machine_learning"


def review_experiment(client: Any, name: str | None = None) -> Any | None:
    """Experiment ``name``, else the one the newest run was logged to (None: no runs yet).

    By the newest run, not the experiments' ``last_update_time``: MLflow's SQL store moves
    that only on create, rename, delete and restore, not when runs are logged.
    """
    if name is not None:
        experiment = client.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage != "active":
            names = sorted(e.name for e in client.search_experiments())
            raise UserError(f"no experiment {name!r} in the store; pass one of: {names}")
        return experiment
    experiments = client.search_experiments()
    if not experiments:
        return None
    newest = client.search_runs(
        [e.experiment_id for e in experiments],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return client.get_experiment(newest[0].info.experiment_id) if newest else None


def review_metrics(runs: Sequence[Any]) -> list[str]:
    """The runs' monitored metric (its best value when they log one) and test metrics, as far
    as any run logged them."""
    from transferlab.reports.comparison import most_common_param, test_metrics_of

    logged = {name for run in runs for name in run.data.metrics}
    monitor = most_common_param(runs, "monitor", "val/acc")
    names = [f"best/{monitor}" if f"best/{monitor}" in logged else monitor]
    names += [name for name in test_metrics_of(runs) if name not in names]
    return [name for name in names if name in logged]


def view_state(metrics: Sequence[str], now_ms: int | None = None) -> str:
    """The shared view's tag value: the metrics as the runs table's columns, in order.

    MLflow 3.17 reads a named envelope (listed under "Views" as ``VIEW_NAME``) with the
    state as a JSON string in it, and falls back to the state's keys at the top level, the
    only form earlier frontends read: the value carries both.
    """
    state = {"selectedColumns": [f"metrics.`{name}`" for name in metrics]}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    envelope = {"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms}
    return json.dumps({**envelope, "state": json.dumps(state), **state})


def save_review_view(client: Any, experiment_id: str) -> str | None:
    """Write the experiment's review view and return its key (None: its runs log no metric)."""
    runs = client.search_runs(
        [experiment_id], order_by=["attributes.start_time DESC"], max_results=1000
    )
    metrics = review_metrics(runs)
    if not metrics:
        return None
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, view_state(metrics))
    return VIEW_KEY


def runs_table_url(base_url: str, experiment_id: str, view_key: str | None = None) -> str:
    """The dashboard page of an experiment's runs table, in the model-training view."""
    query = {"viewStateShareKey": view_key} if view_key else {}
    query["workflowType"] = TRAINING_VIEW
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?" + (
        urllib.parse.urlencode(query)
    )


def open_when_serving(url: str, health_url: str, timeout_s: float = 120.0) -> bool:
    """Open ``url`` in the user's browser once ``health_url`` answers (False: it did not, or
    no browser could be started)."""
    import urllib.request
    import webbrowser

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(health_url, timeout=2).close()
        except OSError:
            time.sleep(0.5)
            continue
        return webbrowser.open(url)
    return False


def open_later(url: str, health_url: str) -> None:
    """:func:`open_when_serving` in a process of its own, started through a short-lived one
    so that it is not left a zombie of the server that replaces this process."""
    import subprocess
    import sys

    opener = "import sys; from transferlab.tracking.review import open_when_serving as o; "
    opener += "o(*sys.argv[1:])"
    launcher = "import subprocess, sys; "
    launcher += f"subprocess.Popen([sys.executable, '-c', {opener!r}, *sys.argv[1:]])"
    subprocess.run([sys.executable, "-c", launcher, url, health_url], check=True)
