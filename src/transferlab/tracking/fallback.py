"""A run that outlives its tracking server.

When a request to the server fails after MLflow's retries (bounded for runs:
``store.CLIENT_RETRIES``, about 30 s) and the server does not answer, or answers with a
server error (5xx), the run goes on without it: a warning says so at once, everything the
run would have sent after that (metric values with their steps, params, tags, which
artifacts) is appended to ``mlflow_unlogged.jsonl`` in the run's folder, and the run ends
with one line naming the metrics that were not logged. Other errors are raised as before.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from transferlab.tracking.redact import redact_text, redact_uri, warn_failed
from transferlab.tracking.store import is_server, server_answers

UNLOGGED_FILE = "mlflow_unlogged.jsonl"
SHOWN_ITEMS = 4  # what the last line names besides metrics; the file has it all

T = TypeVar("T")


class Fallback:
    """What a run sends to ``uri``, once the server is gone, kept in ``folder`` instead."""

    def __init__(self, uri: str, folder: str | Path | None = None) -> None:
        self.uri = uri
        self.folder = Path(folder) if folder is not None else None
        self.lost: str | None = None  # the error that showed the server gone
        self.metrics: Counter[str] = Counter()  # values not logged, per metric
        self.other: list[str] = []  # anything else not logged, in order

    @property
    def path(self) -> Path:
        return (self.folder or Path.cwd()) / UNLOGGED_FILE

    def send(
        self, what: str, call: Callable[[], T], kept: Mapping[str, Any] | None = None
    ) -> T | None:
        """``call()``'s result; once the server is gone, None, and ``what`` (``kept``: its
        content, e.g. ``{"step": 3, "values": {...}}`` for ``metrics``) goes to the file."""
        if self.lost is None:
            try:
                return call()
            except Exception as err:
                if not self.gone(err):
                    raise
                self.give_up(err)
        self.keep(what, kept)
        return None

    def gone(self, err: Exception) -> bool:
        """The server answered ``err`` with a server error, or answers no more."""
        from mlflow.exceptions import RestException

        if not is_server(self.uri):
            return False
        if isinstance(err, RestException) and err.get_http_status_code() >= 500:
            return True
        return not server_answers(self.uri)

    def give_up(self, err: Exception) -> None:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        self.lost = redact_text(f"{type(err).__name__}: {reason}")[:300]
        warn_failed(
            f"the MLflow server {redact_uri(self.uri)} stopped answering; the run goes on "
            f"without it and keeps what it could not log in {self.path}",
            err,
        )

    def keep(self, what: str, kept: Mapping[str, Any] | None = None) -> None:
        if what == "metrics" and kept is not None:
            self.metrics.update(kept["values"].keys())
        elif what not in self.other:
            self.other.append(what)
        record = {"what": what, "time_ms": int(time.time() * 1000), **dict(kept or {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(redact_text(json.dumps(record, default=str)) + "\n")

    def summary(self) -> str:
        """One line: the server lost, every metric not logged, the rest in short, and where
        it all is."""
        parts = []
        if self.metrics:
            count = f"{len(self.metrics)} metric{'s' if len(self.metrics) != 1 else ''}"
            names = ", ".join(sorted(self.metrics))
            parts.append(f"{sum(self.metrics.values())} values of {count} ({names})")
        parts += self.other[:SHOWN_ITEMS]
        if len(self.other) > SHOWN_ITEMS:
            parts.append(f"{len(self.other) - SHOWN_ITEMS} more")
        what = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)
        return (
            f"the MLflow server {redact_uri(self.uri)} went away during the run; the run "
            f"finished here without logging {what or 'anything more'}: see {self.path}"
        )
