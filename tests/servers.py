"""Real servers for tests and benchmarks: a private PostgreSQL cluster, an ``mlflow server``
over it, and a Ray cluster, each on a free loopback port, stopped when the ``with`` block
ends.

PostgreSQL comes from Debian's ``postgresql`` package (``.ci/run`` installs it); its initdb
refuses to run as root, so as root the cluster is made and run by the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from compressflow.distributed import free_port

USER = "compressflow"


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL programs (the newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres(database: str = "mlflow") -> Iterator[str]:
    """A fresh cluster with ``database``, in a new folder under the system's temporary one
    (pytest's are private to root, which the ``postgres`` user cannot enter), removed after;
    yields its SQLAlchemy URI (``postgresql://compressflow@127.0.0.1:<port>/<database>``,
    trust auth on loopback)."""
    programs = postgres_bin()
    if programs is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="compressflow-pg-"))
    try:
        yield from _cluster(programs, folder, database)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _cluster(programs: Path, folder: Path, database: str) -> Iterator[str]:
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    run = lambda *args: subprocess.run(_as_postgres([str(programs / args[0]), *args[1:]]),  # noqa: E731
                                       check=True, capture_output=True, text=True)
    run("initdb", "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, database)
        yield f"postgresql://{USER}@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(_as_postgres([str(programs / "pg_ctl"), "-D", str(data), "-m", "fast",
                                     "-w", "stop"]), capture_output=True)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, *, port: int | None = None,
                  timeout: float = 180) -> Iterator[str]:
    """``mlflow server`` over ``backend`` serving its artifacts from ``artifacts`` (one
    worker) on ``port`` (default: a free one); yields ``http://127.0.0.1:<port>`` once
    ``/health`` answers, and stops it after."""
    port = port or free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "w")
    process = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", backend, "--serve-artifacts",
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, timeout, log.name)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({process.returncode}): {Path(log).read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} did not answer /health in {timeout:.0f} s")


@contextlib.contextmanager
def ray_cluster(num_cpus: int = 2) -> Iterator[str]:
    """A Ray head node of ``num_cpus`` CPUs started by ``ray start`` (as a team starts one,
    apart from any driver, with Ray's token authentication); yields its address,
    ``127.0.0.1:PORT``. A driver joins it with ``RAY_AUTH_MODE=token``."""
    ray = Path(sys.executable).parent / "ray"
    port = free_port()
    # Ray's unix sockets live under the temp folder, and their paths must stay short
    folder = tempfile.mkdtemp(prefix="cfray-", dir="/tmp")
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(ray), "start", "--head", f"--num-cpus={num_cpus}", f"--port={port}",
                    "--include-dashboard=false",
                    "--object-store-memory=100000000", f"--temp-dir={folder}", "--disable-usage-stats"],
                   check=True, capture_output=True, env=environment, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, env=environment, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
