"""Soak test: parallel jobs log metrics into one run store, and nothing may be lost.

    python scripts/soak_tracking.py                                   # 4 jobs x 200 steps, both stores
    python scripts/soak_tracking.py --jobs 2 --steps 10 --backends sqlite   # ~20 s
    python scripts/soak_tracking.py --backends server,server-postgresql     # the team servers

Each job is a fresh process (as each job of a sweep is) that opens its own run with
``transferlab.tracking.start_run`` and logs ``train/loss``, ``train/acc`` and ``lr`` at every
step with ``TrackedRun.log_metrics``, the calls a training run makes; the jobs wait for one
another after their imports and then log together. Two stores by default: ``sqlite``, the
local store a run uses by default (``sqlite:///<dir>/mlflow.db``, made by
``resolve_tracking_uri`` and ``ensure_experiment`` as the CLI makes it), and ``server``, an
``mlflow server`` started here by ``transferlab.tracking.server.mlflow_server`` (sqlite
behind it, served artifacts, one worker, a free port of 127.0.0.1); and on request
``server-postgresql``, the server ``transferlab server --backend postgresql`` starts
(PostgreSQL behind it, four workers).
Afterwards every run's metric histories are read back: points lost and duplicated, values
that differ from those logged, runs not FINISHED, errors the jobs met. Exits 1 when a point
is lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from transferlab.machine import cpu, usable_cores

BACKENDS = ("sqlite", "server", "server-postgresql")
DEFAULT_BACKENDS = ("sqlite", "server")
METRICS = ("train/loss", "train/acc", "lr")
EXPERIMENT = "soak"
JOB_TAG = "soak.job"
SERVER_START_S = 180.0  # a fresh store's migrations take a while on busy cores


def logged_values(job: int, step: int) -> dict[str, float]:
    """What job ``job`` logs at ``step``: distinct per job and step, so a mix-up shows."""
    return {
        "train/loss": 2.0 / (1.0 + step) + job * 1e-3,
        "train/acc": min(1.0, step / 250.0) + job * 1e-6,
        "lr": 1e-3 * 0.99**step,
    }


class Warnings(logging.Handler):
    """Keeps the warnings MLflow and urllib3 log in a job (a retried connection, a slow
    store); a request retried for its 5xx answer shows only in the server's log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0][:300])


def job(index: int, uri: str, experiment_id: str, steps: int, go, messages) -> None:
    """One job: a run of its own, ``steps`` steps of :data:`METRICS`, once ``go`` is set;
    says when it is ready, then reports to ``messages``."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    warned = Warnings()
    for name in ("urllib3", "mlflow"):
        logging.getLogger(name).addHandler(warned)
    from transferlab.tracking import start_run

    report: dict = {"job": index, "run_id": None, "error": None, "call_s": []}
    messages.put(("ready", index))
    go.wait()
    report["started"] = time.time()
    try:
        with start_run(uri, experiment_id, f"soak-{index}", tags={JOB_TAG: str(index)}) as run:
            report["run_id"] = run.run_id
            report["opened"] = time.time()
            for step in range(steps):
                began = time.perf_counter()
                run.log_metrics(logged_values(index, step), step=step)
                report["call_s"].append(time.perf_counter() - began)
    except Exception as err:
        report["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
    report["finished"] = time.time()
    report["warnings"] = warned.messages
    messages.put(("report", report))


def run_jobs(uri: str, experiment_id: str, jobs: int, steps: int) -> tuple[list[dict], float]:
    """Start ``jobs`` processes and, once all have loaded, let them log together; their
    reports and the wall time from then until the last one is done."""
    import queue

    context = multiprocessing.get_context("spawn")
    go, messages = context.Event(), context.Queue()
    processes = [
        context.Process(target=job, args=(i, uri, experiment_id, steps, go, messages))
        for i in range(jobs)
    ]
    for process in processes:
        process.start()
    ready: set[int] = set()
    reports: dict[int, dict] = {}
    released = None
    while len(reports) < jobs:
        try:
            kind, body = messages.get(timeout=1.0)
        except queue.Empty:
            for index, process in enumerate(processes):
                if process.exitcode not in (None, 0) and index not in reports:
                    # Died without a report (a clean exit always sends one): its run, if
                    # any, is judged by what the store kept.
                    reports[index] = {"job": index, "error": f"exit code {process.exitcode}"}
                    ready.add(index)
        else:
            if kind == "ready":
                ready.add(body)
            else:
                reports[body["job"]] = body
        if released is None and len(ready) == jobs:
            go.set()
            released = time.time()
    for process in processes:
        process.join()
    released = released or time.time()
    finished = [r["finished"] for r in reports.values() if "finished" in r]
    wall = max(finished, default=released) - released
    return [reports[i] for i in range(jobs)], wall


def read_back(uri: str, experiment_id: str, jobs: int, steps: int) -> list[dict]:
    """Per job: the run found, its status, and points found, lost, duplicated, wrong."""
    import mlflow

    from transferlab.tracking.run import readable

    client = mlflow.MlflowClient(uri)
    runs: dict[int, list] = {}
    for run in client.search_runs([experiment_id], max_results=1000):
        runs.setdefault(int(run.data.tags.get(JOB_TAG, -1)), []).append(run)
    checked = []
    for index in range(jobs):
        found = runs.get(index, [])
        row = {"job": index, "runs": len(found), "status": None}
        row.update(found=0, lost=0, duplicates=0, wrong=0)
        if len(found) != 1:
            row["lost"] = steps * len(METRICS)
            checked.append(row)
            continue
        (run,) = found
        row["status"] = run.info.status
        expected = {step: logged_values(index, step) for step in range(steps)}
        for key in METRICS:
            history = client.get_metric_history(run.info.run_id, key)
            counts = Counter(point.step for point in history)
            row["found"] += len(history)
            row["lost"] += sum(1 for step in expected if counts[step] == 0)
            row["duplicates"] += sum(n - 1 for n in counts.values() if n > 1)
            row["wrong"] += sum(
                1
                for point in history
                if point.step not in expected
                or point.value != readable(expected[point.step][key])  # as the store keeps it
            )
        checked.append(row)
    return checked


def soak(backend: str, jobs: int, steps: int) -> dict:
    """Run the jobs against one store and check what it kept."""
    from transferlab.tracking.server import mlflow_server, team_server
    from transferlab.tracking.store import ensure_experiment, resolve_tracking_uri

    with tempfile.TemporaryDirectory(prefix=f"soak-{backend}-") as tmp:
        folder = Path(tmp)
        with contextlib.ExitStack() as stack:
            server_log = None
            if backend == "server":
                server = stack.enter_context(
                    mlflow_server(
                        f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts",
                        log=folder / "server.log", start_timeout=SERVER_START_S,
                    )
                )  # fmt: skip
                given, server_log = server.url, server.log
                store_dir = folder / "client"
            elif backend == "server-postgresql":
                folder.chmod(0o755)  # as root, PostgreSQL runs as the postgres user
                server, _ = stack.enter_context(
                    team_server(folder, backend="postgresql", log=folder / "server.log")
                )
                given, server_log = server.url, server.log
                store_dir = folder / "client"
            else:
                given, store_dir = None, folder
            uri = resolve_tracking_uri(given, store_dir)
            experiment_id = ensure_experiment(EXPERIMENT, uri)
            reports, wall = run_jobs(uri, experiment_id, jobs, steps)
            checked = read_back(uri, experiment_id, jobs, steps)
            server_errors = server_error_lines(server_log) if server_log else []
    return summary(backend, jobs, steps, reports, checked, wall, server_errors)


def server_error_lines(log: Path) -> list[str]:
    """The server's log lines that report a failed request (5xx), an error or a locked database."""
    failed = re.compile(r'HTTP/[\d.]+" 5\d\d |database is locked|Traceback|ERROR')
    lines = log.read_text(errors="replace").splitlines()
    return [line[:300] for line in lines if failed.search(line)]


def summary(
    backend: str,
    jobs: int,
    steps: int,
    reports: list[dict],
    checked: list[dict],
    wall: float,
    server_errors: list[str],
) -> dict:
    calls = sorted(s for r in reports for s in r.get("call_s", []))
    expected = jobs * steps * len(METRICS)
    lost = sum(c["lost"] for c in checked)
    errors = [f"job {r['job']}: {r['error']}" for r in reports if r["error"]]
    warnings = [f"job {r['job']}: {w}" for r in reports for w in r.get("warnings", [])]
    return {
        "backend": backend,
        "jobs": jobs,
        "steps": steps,
        "points_expected": expected,
        "points_found": sum(c["found"] for c in checked),
        "lost": lost,
        "duplicates": sum(c["duplicates"] for c in checked),
        "wrong_values": sum(c["wrong"] for c in checked),
        "failed_runs": sum(1 for c in checked if c["status"] != "FINISHED"),
        "errors": len(errors) + len(server_errors),
        "wall_s": wall,
        "points_per_s": (expected - lost) / wall if wall > 0 else None,
        "slowest_start_s": max(
            (r["opened"] - r["started"] for r in reports if "opened" in r), default=None
        ),
        "call_ms_median": 1e3 * statistics.median(calls) if calls else None,
        "call_ms_p99": 1e3 * calls[int(0.99 * (len(calls) - 1))] if calls else None,
        "call_ms_max": 1e3 * calls[-1] if calls else None,
        "job_errors": errors,
        "client_warnings": warnings[:50],
        "client_warning_count": len(warnings),
        "server_error_lines": server_errors[:50],
        "server_error_count": len(server_errors),
        "per_job": [
            {**c, "error": r["error"], "logging_s": r.get("finished", 0) - r.get("started", 0)}
            for c, r in zip(checked, reports, strict=True)
        ],
    }


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    header = (
        "| backend | jobs | steps | points expected | points found | lost | duplicates "
        "| failed runs | errors | wall time s | points/s | slowest run start s | slowest call ms |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['jobs']} | {r['steps']} | {r['points_expected']} "
            f"| {r['points_found']} | {r['lost']} | {r['duplicates']} | {r['failed_runs']} "
            f"| {r['errors']} | {r['wall_s']:.1f} | {number(r['points_per_s'], '.0f')} "
            f"| {number(r['slowest_start_s'], '.1f')} | {number(r['call_ms_max'], '.0f')} |"
        )
    return "\n".join(lines)


def backend_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"backends are a comma list of {', '.join(BACKENDS)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="parallel jobs, one run each")
    parser.add_argument("--steps", type=int, default=200, help="steps each job logs")
    parser.add_argument("--backends", type=backend_list, default=list(DEFAULT_BACKENDS))
    parser.add_argument("--out", type=Path, default=Path("bench-results/soak_tracking.json"))
    args = parser.parse_args()

    rows = [soak(backend, args.jobs, args.steps) for backend in args.backends]
    print(f"\nCPU: {cpu().describe()}, {usable_cores()} usable cores")
    print(f"metrics per step: {', '.join(METRICS)}\n")
    print(table(rows))
    for row in rows:
        print(
            f"\n{row['backend']}: log_metrics calls {number(row['call_ms_median'], '.1f')} ms "
            f"median, {number(row['call_ms_p99'], '.1f')} ms p99; "
            f"wrong values {row['wrong_values']}; "
            f"client warnings {row['client_warning_count']}; "
            f"server error lines {row['server_error_count']}"
        )
        shown = [*row["job_errors"], *row["client_warnings"][:5], *row["server_error_lines"][:5]]
        for line in shown:
            print(f"  {line}")
    result = {"cpu": cpu().describe(), "cores": usable_cores(), "metrics": METRICS, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(row["lost"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
