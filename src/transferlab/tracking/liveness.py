"""Runs whose process died without a word (SIGKILL, OOM killer, power loss) end KILLED.

Nothing runs in a process killed with SIGKILL, so every run records where it runs (host,
pid and the process's start time, which tells a reused pid apart), and the next start in
the same experiment marks the runs of this host whose process is gone as KILLED.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

HOST, PID, STARTED = "process.host", "process.pid", "process.start"


def process_start(pid: int) -> str:
    """The process's start time in clock ticks after boot (/proc), or '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


def process_tags() -> dict[str, str]:
    pid = os.getpid()
    return {HOST: socket.gethostname(), PID: str(pid), STARTED: process_start(pid)}


def is_alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return not started or process_start(pid) in ("", started)


def dead_runs(client: Any, experiment_id: str) -> list[Any]:
    """The RUNNING runs of ``experiment_id`` started on this host whose process is gone."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST}` = '{socket.gethostname()}'",
        max_results=5000,
    )
    dead = []
    for run in runs:
        tags = run.data.tags
        if PID in tags and not is_alive(int(tags[PID]), tags.get(STARTED, "")):
            dead.append(run)
    return dead


def mark_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """End the runs :func:`dead_runs` finds as KILLED; their ids."""
    ended = []
    for run in dead_runs(client, experiment_id):
        tags = run.data.tags
        client.set_tag(
            run.info.run_id,
            "error",
            f"process {tags[PID]} on {tags[HOST]} ended without closing the run "
            "(killed, e.g. SIGKILL or out of memory)",
        )
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    if ended:
        print(
            f"Marked {len(ended)} run(s) KILLED whose process had died: "
            + ", ".join(run_id[:8] for run_id in ended),
            flush=True,
        )
    return ended
