"""The MLflow store's life: created whole, checked before use, servers probed, dead runs closed.

Most tests copy one store made per module: MLflow takes seconds to create and migrate one.
The tests of creation itself, and of killed processes, run real subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from compressflow.errors import ConfigError
from compressflow.tracking import Tracker

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "COMPRESSFLOW_TRACKING_TIMEOUT")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One store made by MLflow (through the public client: the old code has no store.prepare)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def db(template, tmp_path) -> Path:
    """A copy of the template store in this test's own folder."""
    path = tmp_path / "store" / "mlflow.db"
    path.parent.mkdir()
    shutil.copy(template, path)
    return path


@pytest.fixture(autouse=True)
def _http_env():
    # the probe sets MLflow's HTTP knobs with setdefault: put the environment back afterwards
    saved = {name: os.environ.get(name) for name in HTTP_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty compressflow cache (this process and its children): the next new store makes
    MLflow's empty store again, migrations and all."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("COMPRESSFLOW_CACHE", str(cache))
    return cache


def uri_of(path: Path) -> str:
    """The tracking URI of the sqlite file at ``path``."""
    return f"sqlite:///{path}"


def python(code: str, cwd: Path, *args: str) -> subprocess.Popen:
    """This interpreter on ``code`` with ``args``, in ``cwd``, its output piped."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def log_one_run(uri: str, experiment: str = "test") -> str:
    """Open and finish one parent run through the Tracker; its id."""
    tracker = Tracker(uri, experiment, log_models=False)
    run_id = tracker.start_pipeline("p", {}, {"a": 1})
    tracker.end_pipeline("FINISHED")
    return run_id


# --- 1, 2: creation -------------------------------------------------------------------------

KILL_AT = """
    import os, signal, sys
    import sqlalchemy
    from sqlalchemy import event

    @event.listens_for(sqlalchemy.engine.Engine, "after_cursor_execute")
    def _die(conn, cursor, statement, *args):
        if "display_name" in statement:  # in the middle of MLflow's migrations
            os.kill(os.getpid(), signal.SIGKILL)

    from compressflow.tracking import Tracker
    Tracker(sys.argv[1], "test")
"""


def test_a_store_whose_creation_was_killed_opens_again(tmp_path, fresh_cache):
    path = tmp_path / "mlflow.db"
    child = python(KILL_AT, tmp_path, uri_of(path))
    output = child.communicate(timeout=120)[0]
    assert child.returncode == -signal.SIGKILL, output
    log_one_run(uri_of(path))  # before: duplicate column name: display_name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri_of(path))
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert not list(tmp_path.glob(".mlflow.db.*")), "the killed creation's work file stays"
    assert not list(fresh_cache.glob("stores/.*partial*")), "the killed template's work file stays"


def test_ctrl_c_while_creating_a_store_leaves_nothing_and_a_retry_succeeds(tmp_path, fresh_cache):
    import sqlalchemy
    from sqlalchemy import event

    def interrupt(conn, cursor, statement, *args):
        if "display_name" in statement:
            raise KeyboardInterrupt

    path = tmp_path / "mlflow.db"
    event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            Tracker(uri_of(path), "test")
    finally:
        event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", interrupt)
    assert not path.exists() and not list(tmp_path.glob(".mlflow.db.*"))
    log_one_run(uri_of(path))  # the same process again: MLflow's cached engine is let go


RACE = """
    import sys, time
    from pathlib import Path
    import mlflow  # imported before the start line: the two creations overlap
    from compressflow.tracking import Tracker

    Path(sys.argv[2]).touch()
    while len(list(Path(".").glob("ready-*"))) < 2:
        time.sleep(0.01)
    tracker = Tracker(sys.argv[1], "test", log_models=False)
    tracker.start_pipeline(sys.argv[2], {}, {"a": 1})
    tracker.end_pipeline("FINISHED")
"""


def test_two_processes_creating_one_store_both_log_a_run(tmp_path, fresh_cache):
    path = tmp_path / "new" / "mlflow.db"
    children = [python(RACE, tmp_path, uri_of(path), f"ready-{i}") for i in range(2)]
    outputs = [child.communicate(timeout=180)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], "\n".join(outputs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri_of(path))
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["ready-0", "ready-1"]


def test_a_new_store_is_a_copy_of_mlflows_empty_store_with_its_own_artifacts(tmp_path, fresh_cache):
    import sqlalchemy
    from mlflow.tracking import MlflowClient
    from sqlalchemy import event

    from compressflow.sqlite_store import CURRENT, inspect_sqlite

    first = tmp_path / "a" / "mlflow.db"
    log_one_run(uri_of(first))  # makes the cached empty store, migrations and all
    (template,) = fresh_cache.glob("stores/mlflow-*.db")
    statements = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", seen)
    try:
        second = tmp_path / "b" / "mlflow.db"
        log_one_run(uri_of(second))
    finally:
        event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", seen)
    assert not [s for s in statements if s.lstrip().upper().startswith(("CREATE TABLE", "ALTER"))]
    assert inspect_sqlite(second)[0] == CURRENT
    default = MlflowClient(uri_of(second)).get_experiment("0")
    assert default.artifact_location == (second.parent / "mlflow.db.artifacts" / "0").as_uri()
    assert inspect_sqlite(template)[0] == CURRENT


def test_without_a_writable_cache_a_new_store_is_made_in_place(tmp_path, monkeypatch):
    from compressflow.sqlite_store import CURRENT, inspect_sqlite

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("COMPRESSFLOW_CACHE", str(blocked))
    path = tmp_path / "store" / "mlflow.db"
    log_one_run(uri_of(path))
    assert inspect_sqlite(path)[0] == CURRENT and blocked.is_file()


def test_a_current_store_opens_without_lock_or_copy(db):
    from compressflow import store

    store.prepare(uri_of(db))
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]


# --- 3: a store that is there already --------------------------------------------------------

def _truncated(path: Path, template: Path) -> None:
    path.write_bytes(template.read_bytes()[:4096])


def _random(path: Path, template: Path) -> None:
    path.write_bytes(os.urandom(20000))


def _text(path: Path, template: Path) -> None:
    path.write_text("experiments:\n  - name: not a database\n")


@pytest.mark.parametrize("spoil", [_truncated, _random, _text], ids=["truncated", "random", "text"])
def test_a_garbled_store_is_a_config_error_naming_the_file(spoil, template, tmp_path, cli):
    path = tmp_path / "mlflow.db"
    spoil(path, template)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as caught:
        Tracker(uri_of(path), "test")
    assert str(path) in caught.value.message and "mv " in caught.value.hint
    result = cli("compare", "--tracking-uri", uri_of(path))
    assert result.exit_code == 2, result.output
    assert f"error: {path}: not a usable MLflow store" in result.stderr
    assert "Traceback" not in result.output and path.read_bytes() == before


def _set_revision(path: Path, revision: str) -> None:
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def _scripts() -> list:
    """MLflow's schema migrations, the newest first."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    return list(ScriptDirectory.from_config(_get_alembic_config("")).walk_revisions())


def _revisions() -> list[str]:
    return [script.revision for script in _scripts()]


def _before_table(table: str) -> str:
    """The revision just before the migration that creates ``table``."""
    return next(s.down_revision for s in _scripts() if f'"{table}"' in Path(s.path).read_text())


def _old_store(path: Path, revision: str) -> None:
    """What an older MLflow would have left: its schema, and an experiment in it."""
    import sqlite3

    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = sqlalchemy.create_engine(uri_of(path))
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO experiments (name, artifact_location, lifecycle_stage) "
                   "VALUES ('kept', '/tmp/kept', 'active')")


# a table of the last migration: MLflow has committed the migration before, not this one
KILL_IN_MIGRATION = KILL_AT.replace('"display_name" in statement', '"job_locks" in statement')


def test_an_old_store_is_migrated_whole_even_when_the_migration_is_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    from compressflow import sqlite_store

    path = tmp_path / "mlflow.db"
    _old_store(path, _before_table("job_locks"))
    child = python(KILL_IN_MIGRATION, tmp_path, uri_of(path))
    output = child.communicate(timeout=120)[0]
    assert child.returncode == -signal.SIGKILL, output
    log_one_run(uri_of(path))  # before: the killed migration had left half a schema
    assert sqlite_store.inspect_sqlite(path) == (sqlite_store.CURRENT, _revisions()[0])
    assert MlflowClient(uri_of(path)).get_experiment_by_name("kept") is not None


def test_the_schema_head_read_from_the_scripts_is_alembics():
    from mlflow.store.db.utils import _get_latest_schema_revision

    from compressflow import sqlite_store

    head, known = sqlite_store._revisions()
    assert head == _get_latest_schema_revision() and known == set(_revisions())


def test_a_half_migrated_store_is_refused_and_left_as_it_was(db):
    # the mark of an interrupted migration: the schema is newer than its recorded version
    _set_revision(db, _revisions()[3])
    before = db.read_bytes()
    with pytest.raises(ConfigError, match="could not migrate this store") as caught:
        Tracker(uri_of(db), "test")
    assert str(db) in caught.value.message and "unchanged" in caught.value.hint
    assert db.read_bytes() == before and not list(db.parent.glob(".mlflow.db.*"))


def test_a_store_from_a_newer_mlflow_says_so(db):
    _set_revision(db, "f00dfeedbeef")
    with pytest.raises(ConfigError, match="unknown to MLflow"):
        Tracker(uri_of(db), "test")


# --- 4: URIs --------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, says", [
    ("sqlite://", "nothing would be kept"),
    ("sqlite:///:memory:", "nothing would be kept"),
    ("bogus://x", "unknown scheme 'bogus'"),
    ("/tmp/x", "file store"),
    ("mlruns", "file store"),
    ("file:///tmp/x", "file store"),
    ("http://", "no host"),
])
def test_a_uri_that_keeps_nothing_or_names_no_store_is_refused(uri, says, monkeypatch):
    from compressflow import store

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match=says) as caught:
        store.check_uri(uri)
    assert uri in caught.value.message and caught.value.hint


def test_an_in_memory_store_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="nothing would be kept") as caught:
        Tracker("sqlite://", "test")  # before: exit 0, nothing kept
    assert "sqlite:///mlflow.db" in caught.value.hint


def test_the_hints_name_what_would_work(monkeypatch):
    from compressflow import store

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError) as bogus:
        store.check_uri("bogus://x")
    assert "sqlite:///" in bogus.value.hint and "http(s)://" in bogus.value.hint
    with pytest.raises(ConfigError) as folder:
        store.check_uri("/tmp/x")
    assert "sqlite:////tmp/x/mlflow.db" in folder.value.hint


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "sqlite:////tmp/a/b.db", "http://h:5000",
                                 "https://mlflow.example.com/prefix", "postgresql://u@h/db",
                                 "mysql+pymysql://u@h/db", "databricks"])
def test_uris_of_lasting_stores_pass(uri):
    from compressflow import store

    store.check_uri(uri)


def test_a_file_store_passes_where_mlflow_is_told_to_allow_it(monkeypatch):
    from compressflow import store

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store.check_uri("mlruns")


# --- 5: servers -----------------------------------------------------------------------------

@pytest.fixture
def fail_fast(monkeypatch):
    """MLflow's own client quick to give up too, so that a test of the old code fails in
    seconds instead of hanging for minutes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("COMPRESSFLOW_TRACKING_TIMEOUT", "0.5")


def test_a_server_that_never_answers_times_out(fail_fast):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete, and nobody ever reads or answers them
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConfigError, match="did not answer in 0.5 s") as caught:
            Tracker(uri, "test")
    assert time.monotonic() - started < 3 and "COMPRESSFLOW_TRACKING_TIMEOUT" in caught.value.hint
    assert uri in caught.value.message


def test_a_closed_port_is_a_config_error(fail_fast):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    with pytest.raises(ConfigError, match="cannot be reached"):
        Tracker(f"http://127.0.0.1:{port}", "test")


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_a_server_that_answers_passes_and_mlflow_is_told_to_fail_fast(monkeypatch):
    from compressflow import store

    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store.prepare(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2


# --- 6: artifacts ---------------------------------------------------------------------------

def test_artifacts_go_beside_the_store_not_into_the_current_folder(db, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    first, other = tmp_path / "a", tmp_path / "b"
    first.mkdir(), other.mkdir()
    monkeypatch.chdir(first)
    Tracker(uri_of(db), "test")  # the experiment is made from here
    other.chmod(0o555)
    monkeypatch.chdir(other)
    try:
        tracker = Tracker(uri_of(db), "test", log_models=False)
        run_id = tracker.start_pipeline("p", {}, {})
        tracker.log_text("hello", "note.txt")
        tracker.end_pipeline("FINISHED")
    finally:
        other.chmod(0o755)
    artifact_uri = MlflowClient(uri_of(db)).get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith(Path(f"{db}.artifacts").as_uri() + "/")
    assert (Path(f"{db}.artifacts") / artifact_uri.rpartition(".artifacts/")[2] / "note.txt").is_file()
    assert not (first / "mlruns").exists() and not (other / "mlruns").exists()


def test_tracking_artifacts_places_a_new_experiment_elsewhere(db, tmp_path):
    from mlflow.tracking import MlflowClient

    from compressflow.config import TrackingSpec

    spec = TrackingSpec(artifacts="kept")
    tracker = Tracker(uri_of(db), "test", artifacts=spec.artifacts)
    location = MlflowClient(uri_of(db)).get_experiment(tracker.experiment_id).artifact_location
    assert location == (tmp_path / "kept").as_uri()


# --- 7: runs of dead processes --------------------------------------------------------------

STAY_OPEN = """
    import sys, time
    from compressflow.tracking import Tracker

    tracker = Tracker(sys.argv[1], "test", log_models=False)
    tracker.start_pipeline("p", {}, {})
    tracker.start_stage("s", {}, {})
    print("open", flush=True)
    time.sleep(120)
"""


def test_the_runs_of_a_killed_process_are_closed_as_killed(db, tmp_path):
    from mlflow.tracking import MlflowClient

    child = python(STAY_OPEN, tmp_path, uri_of(db))
    try:
        line = child.stdout.readline()
        assert line.strip() == "open", line + child.stdout.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    client = MlflowClient(uri_of(db))
    experiment_id = client.get_experiment_by_name("test").experiment_id
    assert {r.info.status for r in client.search_runs([experiment_id])} == {"RUNNING"}
    Tracker(uri_of(db), "test")
    runs = client.search_runs([experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("p", "KILLED"), ("s", "KILLED")]
    assert all(r.info.end_time for r in runs)


def test_every_run_names_the_process_that_opened_it(db):
    from mlflow.tracking import MlflowClient

    from compressflow.tracking import Tag

    tracker = Tracker(uri_of(db), "test", log_models=False)
    ids = [tracker.start_pipeline("p", {Tag.TASK: "classification"}, {}), tracker.start_stage("s", {}, {})]
    tracker.end_pipeline("FINISHED")
    for run_id in ids:
        tags = MlflowClient(uri_of(db)).get_run(run_id).data.tags
        assert tags[Tag.PID] == str(os.getpid()) and tags[Tag.HOST] == socket.gethostname()
        assert tags[Tag.PROCESS_START].count(":") == 1  # boot id and start time


def _open_run(client, experiment_id: str, pid: str, start: str | None = None,
              host: str | None = None) -> str:
    from compressflow.tracking import Tag

    tags = {Tag.HOST: host or socket.gethostname(), Tag.PID: pid}
    if start:
        tags[Tag.PROCESS_START] = start
    return client.create_run(experiment_id, tags=tags).info.run_id


def test_compare_closes_dead_runs_and_spares_live_and_foreign_ones(db):
    from mlflow.tracking import MlflowClient

    from compressflow import store
    from compressflow.store import experiment_runs
    from compressflow.tracking import Tag

    gone = subprocess.Popen(["true"])
    gone.wait()
    client = MlflowClient(uri_of(db))
    experiment_id = client.create_experiment("test")
    me = store.process_tags()
    dead = _open_run(client, experiment_id, str(gone.pid))
    # this pid, but not the process that opened the run: the pid was reused
    reused = _open_run(client, experiment_id, me[Tag.PID], "another-boot:1")
    alive = _open_run(client, experiment_id, me[Tag.PID], me.get(Tag.PROCESS_START))
    foreign = _open_run(client, experiment_id, str(gone.pid), host="another-host")
    untagged = client.create_run(experiment_id).info.run_id
    status = {r.info.run_id: r.info.status for r in experiment_runs(uri_of(db), "test")}
    assert status[dead] == "KILLED" and status[reused] == "KILLED"
    assert {status[alive], status[foreign], status[untagged]} == {"RUNNING"}
