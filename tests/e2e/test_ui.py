"""The MLflow UI, for real: a small sweep, `compressflow ui` on a free port, headless Chromium.

Needs Debian's chromium and chromium-driver (.ci/run installs them); skips without them.
The screenshot lands in test-artifacts/ (and in the test's tmp folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from compressflow.distributed import free_port
from tests.conftest import REPO, write_pipeline

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and DRIVER.exists()),
    reason="Debian packages chromium and chromium-driver are not installed (.ci/run installs them)")


def _wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1600,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(DRIVER)), options=options)


def test_every_variant_is_on_the_experiment_page(tmp_path, cli, store):
    from mlflow.tracking import MlflowClient

    path = write_pipeline(tmp_path, [{"name": "base", "train": {"epochs": 1}}, {"prune": {"sparsity": 0.5}}],
                          name="ui-sweep", sweep={"stages.1.prune.sparsity": [0.3, 0.6, 0.9]},
                          measure={"latency": False})
    assert cli("run", path, "--tracking-uri", store, "--quiet").exit_code == 0
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("ui-sweep")
    names = [r.info.run_name for r in client.search_runs([experiment.experiment_id])
             if "mlflow.parentRunId" not in r.data.tags]
    assert len(names) == 4  # three variants and the sweep's summary run

    with _ui(tmp_path, store) as port_url:
        browser = _browser(tmp_path / "profile")
        try:
            browser.get(f"{port_url}/#/experiments/{experiment.experiment_id}/runs")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(n in browser.page_source for n in names):
                time.sleep(1)
            shot = tmp_path / "experiment.png"
            browser.save_screenshot(str(shot))
            artifacts = REPO / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            browser.save_screenshot(str(artifacts / "ui-experiment.png"))
            missing = [n for n in names if n not in browser.page_source]
            assert not missing, f"not on the page: {missing}; screenshot: {shot}"
            assert shot.read_bytes()[:4] == b"\x89PNG"
        finally:
            browser.quit()


class _ui:
    """`compressflow ui` in its own process group, stopped with everything it started."""

    def __init__(self, folder: Path, store: str):
        self.folder, self.store = folder, store

    def __enter__(self) -> str:
        port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "compressflow", "ui", "--tracking-uri", self.store, "--port", str(port)],
            cwd=self.folder, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(f"http://127.0.0.1:{port}/health")
        except AssertionError:
            self.__exit__()
            raise
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *_exc) -> None:
        os.killpg(self.server.pid, signal.SIGTERM)
        self.server.wait(timeout=30)
