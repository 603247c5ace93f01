"""The MLflow store's life: which URIs name a store, making a sqlite store whole, checking one
before use, probing a server, closing the runs of processes that died, and reading which
experiments and runs it holds (``compare``, ``sweep``) without creating one.

Every command that opens a store calls :func:`prepare` first: a sqlite store is created or
migrated whole (:mod:`compressflow.sqlite_store`), a server is probed.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from compressflow.errors import ConfigError

TIMEOUT_ENV = "COMPRESSFLOW_TRACKING_TIMEOUT"
DEFAULT_TIMEOUT_S = 5.0
SUPPORTED = ("sqlite:///path/to/mlflow.db, http(s)://host:port (an MLflow server), "
             "postgresql://, mysql://, mssql:// (a database), databricks")
# what MLflow's own HTTP client does after the probe: fail in about a minute, not four
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_DATABASES = ("postgresql", "mysql", "mssql")
_OTHER = ("databricks", "databricks-uc", "uc")
_probed: set[str] = set()


def scheme_of(uri: str) -> str:
    """``sqlite``, ``http``, ... of ``uri`` (a driver suffix such as ``+psycopg2`` dropped);
    empty for a plain path."""
    head, sep, _ = uri.partition(":")
    if not sep or len(head) == 1 or not head[:1].isalpha():  # no scheme, or a drive letter
        return ""
    return head.split("+")[0].lower()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the current folder), else None."""
    if scheme_of(uri) != "sqlite":
        return None
    rest = uri.partition(":")[2]
    if not rest.startswith("///"):
        return None
    path = rest[3:].split("?")[0]
    return Path(path) if path and path != ":memory:" else None


def check_uri(uri: str) -> None:
    """Refuse a tracking URI that names no lasting store MLflow can open, saying what would.

    Accepted: ``sqlite:///<file>``, ``http(s)://``, the databases MLflow knows, databricks
    and schemes that MLflow plugins register. A plain folder or ``file:`` is a file store,
    which MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``: compressflow follows it.
    """
    scheme = uri if uri in _OTHER else scheme_of(uri)  # MLflow takes a bare "databricks"
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None or "mode=memory" in uri:
            raise ConfigError(
                f"tracking URI '{uri}' names no database file: the store would live in memory "
                "and nothing would be kept after the command ends",
                "name a file: sqlite:///mlflow.db (in the current folder) or sqlite:////abs/path/mlflow.db")
        if path.is_dir():
            raise ConfigError(f"tracking URI '{uri}': {path} is a folder, not a database file",
                              f"use sqlite:///{path / 'mlflow.db'}")
        return
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
            return
        place = Path(uri.removeprefix("file://").removeprefix("file:") or "mlruns").expanduser().absolute()
        db = place if place.suffix in (".db", ".sqlite", ".sqlite3") else place / "mlflow.db"
        raise ConfigError(
            f"tracking URI '{uri}' names an MLflow file store (a folder), which MLflow 3 no "
            "longer opens by default",
            f"use a sqlite store: sqlite:///{db} (`mlflow migrate-filestore` moves an old file "
            "store over), or set MLFLOW_ALLOW_FILE_STORE=true to keep a file store")
    if scheme in ("http", "https"):
        if not uri.partition("://")[2].strip("/"):
            raise ConfigError(f"tracking URI '{uri}': no host", "e.g. http://127.0.0.1:5000")
        return
    if scheme in _DATABASES or scheme in _OTHER or scheme in _plugin_schemes():
        return
    raise ConfigError(f"tracking URI '{uri}': unknown scheme '{scheme}'", f"supported: {SUPPORTED}")


@functools.lru_cache(maxsize=1)
def _plugin_schemes() -> frozenset[str]:
    from importlib.metadata import entry_points

    return frozenset(e.name for e in entry_points(group="mlflow.tracking_store"))


def prepare(uri: str) -> None:
    """Make the store at ``uri`` ready to open: check the URI, create or migrate a sqlite
    store whole, or probe a server.

    Raises ConfigError (exit 2) naming the store and what to do, never a traceback.
    """
    check_uri(uri)
    path = sqlite_path(uri)
    if path is not None:
        from compressflow.sqlite_store import prepare_sqlite

        prepare_sqlite(path, artifact_root(uri))
    elif scheme_of(uri) in ("http", "https"):
        probe(uri)


def artifact_root(uri: str, configured: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: ``configured`` (a URI, or a folder absolute or
    relative to the current folder), else ``<db>.artifacts`` beside a sqlite store, else
    None (the server or MLflow decides)."""
    if configured:
        if scheme_of(configured) and scheme_of(configured) != "file":
            return configured
        return Path(configured.removeprefix("file://")).expanduser().resolve().as_uri()
    path = sqlite_path(uri)
    if path is None:
        return None
    path = path.expanduser().resolve()
    return path.with_name(path.name + ".artifacts").as_uri()


# --- servers --------------------------------------------------------------------------------

def timeout_s() -> float:
    """How long a tracking server may take to answer: COMPRESSFLOW_TRACKING_TIMEOUT, else 5 s."""
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: not a number of seconds",
                          f"e.g. {TIMEOUT_ENV}=10") from None


def probe(uri: str) -> None:
    """Ask the server at ``uri`` for ``/health`` once per process: any HTTP answer will do.

    Also sets MLflow's own HTTP timeout and retries (unless set already) so that a server
    that goes away later fails a call in about a minute instead of hanging for minutes.
    """
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if uri in _probed:
        return
    wait = timeout_s()
    hint = (f"start it (mlflow server --host 127.0.0.1 --port 5000), check the URI, point "
            f"--tracking-uri elsewhere, or wait longer: {TIMEOUT_ENV}=<seconds>")
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=wait):
            pass
    except urllib.error.HTTPError:
        pass  # it answered (401, 404 ...): what it wants is for MLflow's client to sort out
    except OSError as error:  # URLError, and a timeout while reading the answer
        import ssl

        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError since 3.10
            raise ConfigError(f"tracking server {uri} did not answer in {wait:g} s", hint) from None
        if not isinstance(reason, ssl.SSLError):  # TLS settings are MLflow's to apply
            text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
            raise ConfigError(f"tracking server {uri} cannot be reached: {text}", hint) from None
    _probed.add(uri)


# --- runs of dead processes -----------------------------------------------------------------

def _proc(pid: int) -> tuple[str, str] | None:
    """``(state, start)`` of ``pid`` from /proc: its state letter, and when it started (boot
    id and clock ticks since boot), which tells a reused pid apart. None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields are counted after the last ')'
    fields = stat.rpartition(")")[2].split()
    return fields[0], f"{boot}:{fields[19]}"


def process_tags() -> dict[str, str]:
    """Tags naming this process, for every run it opens (see :func:`close_dead_runs`)."""
    from compressflow.tracking import Tag

    tags = {Tag.PID: str(os.getpid()), Tag.HOST: socket.gethostname()}
    proc = _proc(os.getpid())
    if proc:
        tags[Tag.PROCESS_START] = proc[1]
    return tags


def is_alive(pid: int, stamp: str | None) -> bool:
    """Whether process ``pid`` of this host runs still, and is the one that started at
    ``stamp`` (when known) rather than a later process given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    proc = _proc(pid)
    if proc is None:
        return True
    # a zombie has exited, only its parent has not reaped it yet
    return proc[0] != "Z" and (not stamp or proc[1] == stamp)


def close_dead_runs(client: Any, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED the RUNNING runs that a process of this host opened and did not outlive
    (SIGKILL, SIGTERM, a crash); returns their ids. Runs of other hosts, and runs without a
    pid tag, are left alone: nothing here can tell whether they still run."""
    from compressflow.tracking import Tag

    host = socket.gethostname()
    runs = client.search_runs(experiment_ids, f"attributes.status = 'RUNNING' and "
                                              f"tags.`{Tag.HOST}` = '{host}'", max_results=1000)
    closed = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get(Tag.PID, "")
        if pid.isdigit() and not is_alive(int(pid), tags.get(Tag.PROCESS_START)):
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def quiet_mlflow_logs() -> None:
    """Hide MLflow's table-creation notices and its pickle warning (a format chosen on purpose)."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)


def store_exists(uri: str) -> bool:
    """False for a sqlite store whose file is not there yet (reading it would create it)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).exists()
    return True


def _reader(uri: str) -> Any:
    """An MlflowClient on the store at ``uri``, checked and prepared; None where no store is
    (reading a sqlite file that is not there would create it)."""
    check_uri(uri)
    if not store_exists(uri):
        return None
    prepare(uri)
    from mlflow.tracking import MlflowClient

    quiet_mlflow_logs()
    return MlflowClient(uri)


def experiment_names(uri: str) -> list[str] | None:
    """The experiments of the store at ``uri`` (None: no store there; reading creates none)."""
    client = _reader(uri)
    return None if client is None else [e.name for e in client.search_experiments()]


def experiment_runs(uri: str, experiment: str, filter_string: str = "",
                    order_by: list[str] | None = None) -> list[Any] | None:
    """Every run of ``experiment`` (parents and stages) matching ``filter_string``; None when
    the store or the experiment is not there. Runs left RUNNING by a dead process of this host
    are closed as KILLED first."""
    client = _reader(uri)
    found = None if client is None else client.get_experiment_by_name(experiment)
    if found is None:
        return None
    close_dead_runs(client, [found.experiment_id])
    return client.search_runs([found.experiment_id], filter_string, order_by=order_by,
                              max_results=5000)
