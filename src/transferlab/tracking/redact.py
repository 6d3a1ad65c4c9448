"""Secrets kept out of what a run records and prints: URIs lose their user info and query,
and the values of credential environment variables are masked wherever they occur.

Everything a run writes to MLflow (params, tags, the config files), prints or logs goes
through :func:`redact_text`; a single store URI goes through :func:`redact_uri`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"
# Variables that hold credentials for MLflow and the artifact stores it writes to.
CREDENTIAL_VARIABLES = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_CLIENT_SECRET",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
)
# Any other variable whose name says it holds a secret (HF_TOKEN, WANDB_API_KEY, ...).
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY")
# Shorter values ("1", "true") would mask ordinary words; those of the named
# credential variables are masked from this length, the others' from the longer one.
MIN_CREDENTIAL_LENGTH = 4
MIN_SECRET_LENGTH = 8
# Hydra's logs escape an override's colons: tracking.uri=http\://user\:password@host.
URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*\\?://[^\s'\"<>`]*")


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/path?query#fragment`` -> ``scheme://host/path``."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    host = authority.rpartition("@")[2]
    path = re.split(r"[?#]", path, maxsplit=1)[0]
    return f"{scheme}://{host}{path}"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The credentials in the environment, longest first (so none is masked in part)."""
    environ = os.environ if environ is None else environ
    values = set()
    for name in list(environ):  # not .items(): other threads may unset a variable meanwhile
        value = environ.get(name) or ""
        if name in CREDENTIAL_VARIABLES:
            shortest = MIN_CREDENTIAL_LENGTH
        elif SECRET_NAME.search(name.upper()):
            shortest = MIN_SECRET_LENGTH
        else:
            continue
        if len(value) >= shortest:
            values.add(value)
    # The password in MLFLOW_TRACKING_URI, wherever else it may turn up.
    authority = environ.get("MLFLOW_TRACKING_URI", "").partition("://")[2].split("/")[0]
    password = authority.rpartition("@")[0].partition(":")[2]
    if len(password) >= MIN_CREDENTIAL_LENGTH:
        values.add(password)
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with every URI redacted and every credential from the environment masked."""
    text = URI.sub(lambda match: redact_uri(match.group(0)), text)
    for secret in secret_values():
        text = text.replace(secret, MASK)
    return text


def redact_values(values: Mapping[str, Any]) -> dict[str, str]:
    """A mapping's values as redacted strings (params and tags)."""
    return {key: redact_text(str(value)) for key, value in values.items()}


def redact_files(*paths: str | os.PathLike) -> None:
    """Redact text files in place (folders: every file in them); the files a run keeps must
    hold no secret either. Each changed file is replaced in one step."""
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                text = file.read_text()
            except (OSError, UnicodeDecodeError):
                continue
            redacted = redact_text(text)
            if redacted != text:
                partial = file.with_name(f".{file.name}.{os.getpid()}.redacting")
                partial.write_text(redacted)
                os.replace(partial, file)


class RedactedRecord(logging.LogRecord):
    """A log record whose message is redacted when it is formatted."""

    def getMessage(self) -> str:
        return redact_text(super().getMessage())


def redact_logging() -> None:
    """Redact every log message of this process (Hydra logs each sweep job's overrides)."""
    if logging.getLogRecordFactory() is logging.LogRecord:
        logging.setLogRecordFactory(RedactedRecord)


def warn_failed(what: str, err: BaseException) -> None:
    """One warning line on stderr for a step that failed without failing the run: ``what``
    (e.g. "the best model was not logged"), the error's type and first line, redacted."""
    import sys

    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    print(
        f"transferlab: warning: {what} ({type(err).__name__}: {redact_text(reason)})",
        file=sys.stderr,
        flush=True,
    )
