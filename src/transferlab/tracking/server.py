"""Starting an MLflow tracking server: the one recipe used by ``transferlab server``, the
tests and ``scripts/soak_tracking.py``.

A team's server (:func:`team_server`) keeps its runs in PostgreSQL when Debian's
``postgresql`` package is installed (a cluster of its own under ``<root>/postgres``,
reachable only through a unix socket in that folder), else in ``<root>/mlflow.db``
(sqlite), and serves the artifacts it keeps under ``<root>/artifacts``, so clients need no
access to its disk.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transferlab.errors import UserError
from transferlab.tracking.store import server_answers

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # a fresh store's migrations take a while on busy cores
STOP_TIMEOUT_S = 10.0
BACKENDS = ("auto", "postgresql", "sqlite")
# Debian's PostgreSQL binaries, one folder per major version.
POSTGRES_BINARIES = "/usr/lib/postgresql/*/bin"
POSTGRES_USER = "postgres"  # who runs the cluster when we are root (PostgreSQL refuses root)
DATABASE = "mlflow"  # the database, and the cluster's superuser
SOCKET_PORT = 5432  # names the socket file only: the cluster listens on no TCP port
MAX_SOCKET_PATH = 107  # a unix socket path's limit on Linux, less its final NUL


@dataclass
class Server:
    """A running ``mlflow server``: its URL, process, backend store and log (None: the
    terminal)."""

    url: str
    process: subprocess.Popen
    store: str
    log: Path | None = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError as err:
            raise UserError(
                f"port {port} of {HOST} is in use ({err.strerror}): pass --port with a free one"
            ) from None


def server_command(store: str, artifacts: Path, port: int, workers: int) -> list[str]:
    """``mlflow server`` on :data:`HOST` with ``store`` for runs and models, serving the
    artifacts it keeps in ``artifacts``."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", HOST, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


@contextlib.contextmanager
def mlflow_server(
    store: str,
    artifacts: Path,
    port: int | None = None,
    workers: int = 1,
    log: Path | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> Iterator[Server]:
    """An ``mlflow server`` (:func:`server_command`, a free port by default), once it
    answers; stopped with its workers on exit. Its output goes to ``log`` (None: ours)."""
    port = free_port() if port is None else port
    # The server's own settings only: a client's URI or credentials are not its business.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    with contextlib.ExitStack() as files:
        out = files.enter_context(log.open("ab")) if log is not None else None
        process = subprocess.Popen(
            server_command(store, artifacts, port, workers),
            stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
            start_new_session=True,  # Ctrl+C reaches us only: we stop it in order
        )  # fmt: skip
    server = Server(f"http://{HOST}:{port}", process, store, log)
    try:
        wait_until_answers(server, start_timeout)
        yield server
    finally:
        stop(process)


def wait_until_answers(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not server_answers(server.url, timeout=2.0):
        if server.process.poll() is not None or time.monotonic() > deadline:
            state = (
                "stopped" if server.process.poll() is not None else f"no answer in {timeout:.0f} s"
            )
            said = (
                f"its log {server.log} ends: {last_line(server.log)!r}"
                if server.log
                else "see its output above"
            )
            raise UserError(f"mlflow server at {server.url}: {state} ({said})")
        time.sleep(0.5)


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1][:300] if lines else ""


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process and its workers; SIGKILL if they are not gone in ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --------------------------------------------------------------------------- backend


def postgres_bin_dir(pattern: str = POSTGRES_BINARIES) -> Path | None:
    """The newest installed PostgreSQL's folder of ``initdb`` and ``pg_ctl`` (None: none)."""
    found = [
        Path(folder)
        for folder in glob.glob(pattern)
        if all((Path(folder) / name).is_file() for name in ("initdb", "pg_ctl"))
    ]

    def major(folder: Path) -> tuple[int, str]:
        name = folder.parent.name
        return (int(name) if name.isdigit() else -1, name)

    return max(found, key=major, default=None)


def has_postgres_driver() -> bool:
    return importlib.util.find_spec("psycopg2") is not None


def choose_backend(requested: str, bin_dir: Path | None, driver: bool) -> tuple[str, str]:
    """``postgresql`` or ``sqlite``, and why: ``auto`` takes PostgreSQL when its binaries
    and Python driver are installed; asking for PostgreSQL without them is one line."""
    install_server = "sudo apt-get install postgresql"
    install_driver = "pip install 'transferlab[server]'"
    if requested not in BACKENDS:
        raise UserError(f"--backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "sqlite":
        return "sqlite", "asked for"
    if bin_dir is not None and driver:
        return "postgresql", f"PostgreSQL {bin_dir.parent.name} is installed"
    if requested == "postgresql":
        missing = (
            f"PostgreSQL is not installed ({install_server})"
            if bin_dir is None
            else f"its Python driver psycopg2 is missing ({install_driver})"
        )
        raise UserError(f"--backend postgresql: {missing}; or pass --backend sqlite")
    if bin_dir is None:
        return "sqlite", f"PostgreSQL is not installed; `{install_server}` to use it"
    return "sqlite", f"psycopg2 is missing; `{install_driver}` to use PostgreSQL"


def cluster_user() -> str | None:
    """Who runs the cluster: us, or :data:`POSTGRES_USER` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise UserError(
            f"PostgreSQL refuses to run as root and there is no {POSTGRES_USER!r} user "
            "(Debian's postgresql package makes it): run as another user, or --backend sqlite"
        ) from None
    return POSTGRES_USER


def as_cluster_user(
    user: str | None, command: list[str], folder: Path, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``command`` as ``user`` (None: us) in ``folder``; ``check``: one line if it fails."""
    account = pwd.getpwnam(user) if user else None
    result = subprocess.run(
        command,
        cwd=folder,
        capture_output=True,
        text=True,
        user=account.pw_uid if account else None,
        group=account.pw_gid if account else None,
        extra_groups=[] if account else None,
        env={**os.environ, "HOME": account.pw_dir} if account else None,
    )
    if check and result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise UserError(f"{Path(command[0]).name} failed for {folder}: {said[-1]}")
    return result


def postgres_uri(folder: Path) -> str:
    """The SQLAlchemy URI of the cluster's database through its unix socket in ``folder``
    (psycopg2 named: SQLAlchemy 2.1 would pick psycopg 3 for ``postgresql://``)."""
    return f"postgresql+psycopg2://{DATABASE}@/{DATABASE}?host={folder}&port={SOCKET_PORT}"


def check_cluster_folder(folder: Path, user: str | None) -> None:
    """A socket path that fits, and, for another user, a folder that user can reach."""
    socket_path = folder / f".s.PGSQL.{SOCKET_PORT}"
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise UserError(
            f"{folder} is too long a path for PostgreSQL's socket ({len(str(socket_path))} "
            f"characters, at most {MAX_SOCKET_PATH}): pass a shorter --root"
        )
    if user is None:
        return
    if as_cluster_user(user, ["test", "-w", str(folder)], Path("/"), check=False).returncode:
        raise UserError(
            f"the {user!r} user (PostgreSQL refuses root) cannot reach {folder}: pass a --root "
            f"under a folder others may enter (e.g. /srv/mlflow), or --backend sqlite"
        )


@contextlib.contextmanager
def postgres_cluster(folder: Path, bin_dir: Path) -> Iterator[str]:
    """A PostgreSQL cluster in ``folder`` (made on first use) with a database ``mlflow``,
    listening on a unix socket in that folder only (no TCP port), with trust for whoever
    can enter the folder: its owner (and root). Its URI; stopped on exit."""
    user = cluster_user()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if user is not None:
        account = pwd.getpwnam(user)
        os.chown(folder, account.pw_uid, account.pw_gid)
    check_cluster_folder(folder, user)
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(folder)]
    if not (folder / "PG_VERSION").exists():
        as_cluster_user(
            user,
            [str(bin_dir / "initdb"), "-D", str(folder), "-U", DATABASE, "--auth=trust",
             "-E", "UTF8", "--locale=C"],
            folder,
        )  # fmt: skip
        with (folder / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# transferlab server: a unix socket (in the data folder, given at start) only.\n"
                "listen_addresses = ''\n"
                "unix_socket_permissions = 0700\n"
                f"port = {SOCKET_PORT}\n"
            )
    if as_cluster_user(user, [*pg_ctl, "status"], folder, check=False).returncode != 0:
        log, socket_dir = folder / "postgres.log", f"-k {shlex.quote(str(folder))}"
        start = [*pg_ctl, "-l", str(log), "-o", socket_dir, "-w", "-t", "60", "start"]
        as_cluster_user(user, start, folder)
    try:
        create_database(folder)
        yield postgres_uri(folder)
    finally:
        as_cluster_user(user, [*pg_ctl, "-m", "fast", "-w", "stop"], folder)


def create_database(folder: Path) -> None:
    import psycopg2

    connection = psycopg2.connect(
        host=str(folder), port=SOCKET_PORT, user=DATABASE, dbname="postgres"
    )
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cursor.fetchone() is None:
                cursor.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        connection.close()


def default_workers(backend: str) -> int:
    """sqlite takes one writer at a time: one worker; PostgreSQL: MLflow's default, 4."""
    return 1 if backend == "sqlite" else 4


@contextlib.contextmanager
def team_server(
    root: Path,
    port: int | None = None,
    backend: str = "auto",
    workers: int | None = None,
    log: Path | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> Iterator[tuple[Server, str]]:
    """The server ``transferlab server`` runs, with all it keeps under ``root``; it and why
    its backend was chosen. Stops the server, then PostgreSQL, on exit."""
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    bin_dir = postgres_bin_dir()
    kind, why = choose_backend(backend, bin_dir, has_postgres_driver())
    with contextlib.ExitStack() as stack:
        if kind == "postgresql":
            assert bin_dir is not None
            store = stack.enter_context(postgres_cluster(root / "postgres", bin_dir))
        else:
            store = f"sqlite:///{root / 'mlflow.db'}"
        server = stack.enter_context(
            mlflow_server(
                store, root / "artifacts", port, workers or default_workers(kind), log,
                start_timeout,
            )
        )  # fmt: skip
        yield server, why


def describe_store(store: str) -> str:
    """Where a server's backend store is, in words."""
    if store.startswith("postgresql"):
        folder = store.partition("?host=")[2].partition("&")[0]
        return f"PostgreSQL, database {DATABASE!r} of the cluster in {folder} (unix socket only)"
    return f"sqlite, {store.removeprefix('sqlite:///')}"


def shown_command(server: Server) -> str:
    """The ``mlflow server`` command line, to copy (with ``mlflow`` for our Python)."""
    command = server.process.args
    return shlex.join(["mlflow", *command[3:]])  # type: ignore[index]
