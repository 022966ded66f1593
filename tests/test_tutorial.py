"""docs/tutorials/own-data.md runs: its blocks marked ``<!-- ci -->`` are executed in a temp folder.

``<!-- ci: file NAME -->`` before a code block writes the block to ``NAME`` (``make_data.py``, ``mynets.py``,
...); ``<!-- ci -->`` before a ``console`` block runs its ``$ ...`` lines in order: ``fewflow ...`` in
process (click's ``CliRunner`` on ``fewflow.cli.main.cli``, the line split with ``shlex``) with
``--steps`` capped at :data:`STEPS`, ``python FILE.py`` with ``runpy``. The lines after a command are its
expected output: a command whose output is an ``error: ...`` line must fail with exactly that line (exit
status 2); the others must succeed and print every expected line except the ones that depend on training
(``done: ...``, tables).
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fewflow.runs
from fewflow.cli.main import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "own-data.md"
STEPS = 20  # the page trains for 500-2000 steps; CI checks that the commands run, not the quality
BLOCK = re.compile(r"<!-- ci(?:: file (?P<file>[\w.]+))? -->\n```\w*\n(?P<body>.*?)\n```", re.S)
SKIPPED = {"head"}  # shell commands of the page that only show a file


def ci_blocks() -> list[tuple[str | None, str]]:
    return [(m["file"], m["body"]) for m in BLOCK.finditer(DOC.read_text())]


def commands(body: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        else:
            assert out, f"output before the first command in a ci block of {DOC.name}: {line!r}"
            out[-1][1].append(line)
    return out


def capped(args: list[str]) -> list[str]:
    args = list(args)
    for i, a in enumerate(args[:-1]):
        if a == "--steps":
            args[i + 1] = str(min(int(args[i + 1]), STEPS))
    return args


def check_inputs() -> None:
    """make_data.py wrote what the page uses: two class folders of small RGB pngs, an npz with c."""
    classes = sorted(p.name for p in Path("photos").iterdir() if p.is_dir())
    assert classes == ["cats", "dogs"]
    with Image.open(Path("photos/cats/000.png")) as im:
        assert im.mode == "RGB" and im.size == (16, 16)
    with np.load("ring.npz") as f:
        assert sorted(f.files) == ["c", "x"] and f["x"].shape == (2000, 2)
        assert f["c"].shape == (2000, 1) and f["c"].dtype.kind == "f"  # a continuous condition
    assert np.load("c.npy").shape == (500, 1)


def test_tutorial_blocks_run(tmp_path, monkeypatch):
    blocks = ci_blocks()
    ran = [c for f, body in blocks if f is None for c, _ in commands(body)]
    assert any(c.startswith("python make_data.py") for c in ran)
    assert any(c.startswith("fewflow train --data photos") for c in ran)  # a folder of images
    assert any(c.startswith("fewflow sample") and "--cond" in c for c in ran)  # the conditional 2-D task
    monkeypatch.chdir(tmp_path)
    # samples.png / trajectories.png after each run cost more than the shortened training: not here
    monkeypatch.setattr(fewflow.runs, "_figures", lambda *a, **k: None)
    modules = set(sys.modules)
    try:
        for fname, body in blocks:
            if fname is not None:
                Path(fname).write_text(body + "\n")
                continue
            for cmd, expected in commands(body):
                run_command(cmd, expected)
    finally:
        for name in set(sys.modules) - modules:  # mynets, mydata: imported from this temp folder
            if name.split(".")[0] in ("mynets", "mydata", "make_data"):
                sys.modules.pop(name, None)


def run_command(cmd: str, expected: list[str]) -> None:
    argv = shlex.split(cmd)
    if argv[0] in SKIPPED:
        return
    if argv[0] == "python":
        runpy.run_path(argv[1], run_name="__main__")
        if argv[1] == "make_data.py":
            check_inputs()
        return
    assert argv[0] == "fewflow", f"{DOC.name}: no way to run {cmd!r} in CI"
    result = CliRunner().invoke(cli, capped(argv[1:]), catch_exceptions=False)
    errors = [line for line in expected if line.startswith("error: ")]
    if errors:
        assert result.exit_code == 2, (cmd, result.output)
        assert result.stderr.strip() == errors[0], cmd
        return
    assert result.exit_code == 0, (cmd, result.output)
    got = result.output.splitlines()
    for line in expected:
        if line.startswith(("done: ", "|")):
            continue  # the loss after training and the metric tables depend on the number of steps
        assert line in got, (cmd, line, result.output)


@pytest.mark.parametrize("args, want", [(["train", "--steps", "1000"], ["train", "--steps", str(STEPS)]),
                                        (["sample", "--n", "5"], ["sample", "--n", "5"])])
def test_steps_are_capped(args, want):
    assert capped(args) == want
