"""Stage keys know the plugin's code: editing it changes the key, so reuse cannot go stale."""

from __future__ import annotations

import importlib
import sys

from compressflow.fingerprint import code_digest, package_digest


def _plugin(folder, body: str):
    package = folder / "fp_plugin"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("from fp_plugin.stages import Cut\n")
    (package / "stages.py").write_text(
        "from compressflow import Stage\n\n\nclass Cut(Stage):\n"
        "    kind = 'prune'\n    method = 'fp'\n\n    def run(self, model, ctx):\n"
        f"        {body}\n")
    for name in [m for m in sys.modules if m.startswith("fp_plugin")]:
        del sys.modules[name]
    package_digest.cache_clear()
    return importlib.import_module("fp_plugin").Cut


def test_editing_a_plugins_code_changes_its_digest(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_digest(_plugin(tmp_path, "return model"))
    assert code_digest(_plugin(tmp_path, "return model")) == before  # same code, same digest
    after = code_digest(_plugin(tmp_path, "return model  # changed"))
    assert after != before


def test_the_stage_key_carries_the_digest(tmp_path, monkeypatch):
    from compressflow.engine import validate
    from tests.conftest import write_pipeline

    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}}])
    key = validate(path).stages[0].key
    monkeypatch.setattr("compressflow.engine.code_digest", lambda thing: "edited")
    assert validate(path).stages[0].key != key
