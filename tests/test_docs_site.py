"""The documentation site builds with MkDocs in strict mode (a broken link, a missing page or a docstring
that mkdocstrings cannot render fails), and it covers every method page, tutorial and public package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    docs = ROOT / "docs"
    for page in sorted(docs.glob("methods/*.md")) + sorted(docs.glob("tutorials/*.md")):
        rel = page.relative_to(ROOT / "docs").with_suffix("")
        assert (tmp_path / rel / "index.html").is_file(), rel
    api = (tmp_path / "api" / "paths" / "index.html").read_text()
    assert "AffinePath" in api and "LinearSchedule" in api  # rendered from the docstrings
    assert (tmp_path / "results" / "fewstep" / "index.html").is_file()  # the committed benchmark tables
