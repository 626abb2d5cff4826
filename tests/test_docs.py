"""Every ```python block in README.md and docs/ runs (blocks of one file share a namespace, in order)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_snippets_run(path, tmp_path, monkeypatch):
    blocks = BLOCK.findall(path.read_text())
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    environment = dict(os.environ)  # and what they set in the environment is undone after them
    from lars_plugins import registry

    entries = dict(registry._ENTRIES)  # as are the optimizers they register
    namespace: dict = {"__name__": "__docs__"}
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
            except Exception as err:  # pragma: no cover - the message is the point
                raise AssertionError(f"{path.name}, python block {i} failed: {err!r}\n{block}") from err
    finally:
        os.environ.clear()
        os.environ.update(environment)
        registry._ENTRIES.clear()
        registry._ENTRIES.update(entries)
