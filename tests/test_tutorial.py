"""The tutorials run: the blocks of each docs/tutorials/*.md page marked ``<!-- ci -->`` run in a temp folder.

``<!-- ci: file NAME -->`` before a code block writes the block to ``NAME`` (``make_data.py``, ``mynets.py``,
...); ``<!-- ci -->`` before a ``console`` block runs its ``$ ...`` lines in order: ``fewflow ...`` in
process (click's ``CliRunner`` on ``fewflow.cli.main.cli``, the line split with ``shlex``) with
``--steps`` capped at :data:`STEPS`, ``python FILE.py`` with ``runpy`` (``"train.steps": N`` in a file
capped the same way). The lines after a command are its
expected output: a command whose output is an ``error: ...`` line must fail with exactly that line (exit
status 2); the others must succeed and print every expected line except the ones that depend on training
(``done: ...``, tables). A page marked ``<!-- ci: needs mnist -->`` runs only when MNIST is cached (``fewflow
fetch mnist``; CI has no network at test time).
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

TUTORIALS = Path(__file__).resolve().parents[1] / "docs" / "tutorials"
DOC = TUTORIALS / "own-data.md"
PAGES = sorted(p for p in TUTORIALS.glob("*.md") if "<!-- ci" in p.read_text())
STEPS = 20  # the pages train for 500-20000 steps; CI checks that the commands run, not the quality
BLOCK = re.compile(r"<!-- ci(?:: file (?P<file>[\w.]+))? -->\n```\w*\n(?P<body>.*?)\n```", re.S)
FILE_STEPS = re.compile(r'("train\.steps":\s*)(\d+)')
SKIPPED = {"head"}  # shell commands of the page that only show a file


def ci_blocks(doc: Path = DOC) -> list[tuple[str | None, str]]:
    return [(m["file"], m["body"]) for m in BLOCK.finditer(doc.read_text())]


def commands(body: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        else:
            assert out, f"output before the first command in a ci block: {line!r}"
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


def test_own_data_covers_its_promises():
    ran = [c for f, body in ci_blocks() if f is None for c, _ in commands(body)]
    assert any(c.startswith("python make_data.py") for c in ran)
    assert any(c.startswith("fewflow train --data photos") for c in ran)  # a folder of images
    assert any(c.startswith("fewflow sample") and "--cond" in c for c in ran)  # the conditional 2-D task


def test_every_tutorial_is_checked():
    """A tutorial without ci blocks would silently go stale."""
    assert {p.name for p in PAGES} == {p.name for p in TUTORIALS.glob("*.md")}
    assert len(PAGES) >= 6


@pytest.mark.slow
@pytest.mark.parametrize("doc", PAGES, ids=[p.stem for p in PAGES])
def test_tutorial_blocks_run(doc, tmp_path, monkeypatch):
    if "<!-- ci: needs mnist -->" in doc.read_text():
        from fewflow.data.base import default_cache_dir

        if not (default_cache_dir() / "mnist.npz").exists():
            pytest.skip("MNIST is not cached (fewflow fetch mnist)")
    blocks = ci_blocks(doc)
    assert blocks, doc
    monkeypatch.chdir(tmp_path)
    # samples.png / trajectories.png after each run cost more than the shortened training: not here
    monkeypatch.setattr(fewflow.runs, "_figures", lambda *a, **k: None)
    modules = set(sys.modules)
    try:
        for fname, body in blocks:
            if fname is not None:
                body = FILE_STEPS.sub(lambda m: m[1] + str(min(int(m[2]), STEPS)), body)
                Path(fname).write_text(body + "\n")
                continue
            for cmd, expected in commands(body):
                run_command(cmd, expected)
    finally:
        for name in set(sys.modules) - modules:  # mynets, mydata: imported from this temp folder
            if name.split(".")[0] in ("mynets", "mydata", "make_data", "moons", "one_step", "grids"):
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
    assert argv[0] == "fewflow", f"no way to run {cmd!r} in CI"
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
        if line not in got and any(ch.isdigit() for ch in line) and ":" in line:
            # a summary with measured numbers ("flair inpaint: 8 image(s), PSNR 13.35 dB ..."): its head
            head = line.split(":")[0] + ":"
            assert any(g.startswith(head) for g in got), (cmd, line, result.output)
            continue
        assert line in got, (cmd, line, result.output)


@pytest.mark.parametrize("args, want", [(["train", "--steps", "1000"], ["train", "--steps", str(STEPS)]),
                                        (["sample", "--n", "5"], ["sample", "--n", "5"])])
def test_steps_are_capped(args, want):
    assert capped(args) == want
