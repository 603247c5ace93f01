"""A sqlite MLflow store made whole: created from a cached empty store, migrated on a copy,
checked from its header in milliseconds (:func:`compressflow.store.prepare` calls
:func:`prepare_sqlite`).

A new store is copied from an empty store MLflow made and migrated once for its version and
schema revision (``$COMPRESSFLOW_CACHE/stores``, default ``~/.cache/compressflow``: MLflow's
migrations take seconds), into a work file beside it, and renamed into place under
``<db>.lock``, so that an interrupted or concurrent first run never leaves a half-made file.
An old store is migrated on a copy; the original stays if that fails.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Iterator, NoReturn

from compressflow.cache import cache_folder
from compressflow.errors import ConfigError

SQLITE_HEADER = b"SQLite format 3\x00"

MISSING, EMPTY, CURRENT, OLD = "missing", "empty", "current", "old"


def prepare_sqlite(path: Path, root: str) -> None:
    """Create the store at ``path`` (the default experiment's artifacts under ``root``) or
    bring it to this MLflow's schema; nothing when it is current. ConfigError when it is
    no MLflow store or cannot be written."""
    state, _ = inspect_sqlite(path)
    if state == CURRENT:
        return  # the common case: no lock, no write
    try:
        with _locked(path):
            state, revision = inspect_sqlite(path)  # another process may have done it meanwhile
            if state in (MISSING, EMPTY):
                _create(path, root)
            elif state == OLD:
                _migrate(path, revision)
    except OSError as error:
        raise ConfigError(f"{path}: cannot create or update the MLflow store: {error.strerror or error}",
                          "point --tracking-uri (tracking.uri) at a folder you can write, e.g. "
                          "sqlite:////tmp/mlflow.db") from error


def inspect_sqlite(path: Path) -> tuple[str, str | None]:
    """``(state, schema revision)`` of the file at ``path``: missing, empty (new), current or
    old (MLflow can migrate it). A file that is no MLflow store raises ConfigError."""
    if not path.exists():
        return MISSING, None
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not an MLflow database file",
                          f"use sqlite:///{path / 'mlflow.db'}")
    size = path.stat().st_size
    if size == 0:
        return EMPTY, None
    with open(path, "rb") as handle:
        head = handle.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_HEADER):
        _broken(path, "not an SQLite database")
    page_size = int.from_bytes(head[16:18], "big")
    pages = int.from_bytes(head[28:32], "big")
    # the header's page count holds only while "version-valid-for" equals the change counter;
    # a WAL file may hold pages the main file does not have yet
    expected = (65536 if page_size == 1 else page_size) * pages
    if head[24:28] == head[92:96] and size < expected and not Path(f"{path}-wal").exists():
        _broken(path, f"cut short: {size:,} of {expected:,} bytes")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True,
                                                timeout=30)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                return EMPTY, None
            if "alembic_version" not in tables:
                _broken(path, "no alembic_version table (an interrupted creation, or another "
                              "program's database)")
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.DatabaseError as error:
        _broken(path, f"damaged: {error}")
    if len(rows) != 1:
        _broken(path, f"{len(rows)} schema versions in alembic_version")
    revision = rows[0][0]
    head_rev, known = _revisions()
    if revision == head_rev:
        return CURRENT, revision
    if revision not in known:
        import mlflow

        raise ConfigError(f"{path}: schema version {revision} is unknown to MLflow "
                          f"{mlflow.__version__} (written by a newer MLflow?)",
                          "upgrade mlflow, or point --tracking-uri (tracking.uri) at another store")
    return OLD, revision


def _broken(path: Path, why: str) -> NoReturn:
    raise ConfigError(f"{path}: not a usable MLflow store: {why}",
                      f"move it aside (mv {path} {path}.broken) and run again to start a new store, "
                      "or point --tracking-uri (tracking.uri) at another store")


_REVISION = re.compile(r"""^revision\s*(?::[^=]*)?=\s*['"](\w+)['"]""", re.M)
_DOWN = re.compile(r"^down_revision\s*(?::[^=]*)?=(.*)$", re.M)


@functools.lru_cache(maxsize=1)
def _revisions() -> tuple[str, frozenset[str]]:
    """MLflow's head schema revision, and every revision it knows.

    Read from the migration scripts as text: loading them through alembic, as MLflow does,
    costs about a second, and this runs on every command.
    """
    folder = Path(importlib.util.find_spec("mlflow").submodule_search_locations[0])
    revisions, parents = set(), set()
    for script in (folder / "store" / "db_migrations" / "versions").glob("*.py"):
        text = script.read_text()
        if found := _REVISION.search(text):
            revisions.add(found[1])
            if down := _DOWN.search(text):
                parents.update(re.findall(r"""['"](\w+)['"]""", down[1]))
    heads = revisions - parents
    if len(heads) != 1:  # scripts of an unexpected form: ask alembic
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config

        script_dir = ScriptDirectory.from_config(_get_alembic_config(""))
        heads, revisions = set(script_dir.get_heads()), {s.revision for s in script_dir.walk_revisions()}
    (head,) = heads
    return head, frozenset(revisions)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """``<db>.lock`` held exclusively: one process creates or migrates, the others wait."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


def _partial(path: Path) -> Path:
    """A work file in the store's folder, so that os.replace is a rename on one file system.
    Creation runs only under the lock, so any other work file is left by a dead process."""
    for left in path.parent.glob(f".{path.name}.*.partial*"):
        left.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")


def _discard(tmp: Path) -> None:
    for left in (tmp, Path(f"{tmp}-journal")):
        left.unlink(missing_ok=True)


def _create(path: Path, root: str) -> None:
    """A new store: a copy of this MLflow's empty store (:func:`_template`; made here by
    MLflow where no cache can be written) with its default experiment's artifacts beside
    the store, written as a work file, renamed into place."""
    try:
        template = _template()
    except OSError:  # no writable cache (a read-only home): MLflow makes this one itself
        template = None
    tmp = _partial(path)
    try:
        if template is None:
            _migrated(tmp)
        else:
            shutil.copyfile(template, tmp)
        with contextlib.closing(sqlite3.connect(tmp)) as db, db:
            db.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                       "last_update_time = ? WHERE experiment_id = 0",
                       (f"{root.rstrip('/')}/0", *[int(time.time() * 1000)] * 2))
        os.replace(tmp, path)
    finally:
        _discard(tmp)


def _template() -> Path:
    """An empty store made and migrated by this MLflow, kept in ``$COMPRESSFLOW_CACHE/stores``
    (default ``~/.cache/compressflow``) under its version and schema revision: MLflow's
    migrations take seconds, and every new store would run them again."""
    import mlflow

    folder = cache_folder("stores")
    path = folder / f"mlflow-{mlflow.__version__}-{_revisions()[0]}.db"
    if path.is_file() and inspect_sqlite(path)[0] == CURRENT:
        return path
    with _locked(path):  # one process makes it; the others wait and copy it
        if not (path.is_file() and inspect_sqlite(path)[0] == CURRENT):
            tmp = _partial(path)
            try:
                _migrated(tmp)
                os.replace(tmp, path)
            finally:
                _discard(tmp)
    return path


def _migrated(path: Path) -> None:
    """An empty store at ``path``, made and migrated by MLflow."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from compressflow.store import quiet_mlflow_logs

    quiet_mlflow_logs()
    uri = f"sqlite:///{path}"
    try:
        SqlAlchemyStore(uri, path.with_suffix(".artifacts").as_uri())
    finally:
        # MLflow caches an engine a URI: let go of the file, interrupted or not
        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()


def _migrate(path: Path, revision: str | None) -> None:
    """Bring an old store to MLflow's schema on a copy; the original stays if that fails."""
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _upgrade_db

    from compressflow.store import quiet_mlflow_logs

    quiet_mlflow_logs()
    tmp = _partial(path)
    try:
        with contextlib.closing(sqlite3.connect(path)) as source, \
                contextlib.closing(sqlite3.connect(tmp)) as copy:
            source.backup(copy)  # a consistent copy even while others read the store
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _upgrade_db(engine)
        finally:
            engine.dispose()
        os.replace(tmp, path)
    except Exception as error:  # alembic and sqlalchemy raise many kinds; all mean the same here
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{path}: MLflow {mlflow.__version__} could not migrate this store from schema "
            f"{revision}: {first}",
            f"the file is unchanged; its schema may be half-updated by an interrupted run: move it "
            f"aside (mv {path} {path}.broken) to start a new store, or point --tracking-uri "
            "(tracking.uri) at another store") from error
    finally:
        _discard(tmp)
