"""MkDocs hooks of fewflow's documentation site (``make docs``).

* The navigation is built here: the guides in a fixed order, every ``docs/tutorials/*.md`` and
  ``docs/methods/*.md`` page (a new page appears without editing ``mkdocs.yml``), and an API reference with
  one generated page per public package, rendered from the docstrings by mkdocstrings.
* The committed benchmark tables (``benchmarks/results/*.md`` and their plots) are added to the site under
  ``results/``, and links to them from the docs pages (written as ``../benchmarks/results/NAME.md`` or
  ``../../benchmarks/results/NAME.md`` so that they also work when the markdown is read in the repository)
  are pointed there.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

GUIDES = [
    ("Home", "index.md"),
    ("Command line", "cli.md"),
    ("Architecture", "architecture.md"),
    ("Adding a method", "adding-a-method.md"),
    ("Pretrained folders", "pretrained.md"),
    ("diffusers interop", "interop-diffusers.md"),
    ("Sequences", "sequences.md"),
    ("Control and robot policies", "control.md"),
    ("Point clouds", "points.md"),
    ("Scaling out and GPUs", "scaling.md"),
    ("Benchmarks", "benchmarks.md"),
]
TUTORIAL_ORDER = ["2d", "digits", "fewstep", "samplers", "own-data", "inverse", "mnist"]
# One API page per public package or module, in the order of the layers.
API = [
    "paths", "sources", "data", "models", "couplings", "solvers", "guidance", "metrics", "inverse",
    "interop", "methods", "objectives", "train", "config", "runs", "sampling", "evaluate", "pretrained",
    "points", "motion", "control",
]
_RESULT_LINK = re.compile(r"\]\((?:\.\./)+benchmarks/results/")


def _title(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def _api_modules() -> list[str]:
    return [m for m in API if (ROOT / "src" / "fewflow" / m).exists()
            or (ROOT / "src" / "fewflow" / f"{m}.py").exists()]


def on_files(files: Files, config) -> Files:
    for name in _api_modules():
        page = f"# fewflow.{name}\n\n::: fewflow.{name}\n"
        files.append(File.generated(config, f"api/{name}.md", content=page))
    for path in sorted(RESULTS.glob("*")):
        if path.suffix in (".md", ".png", ".json"):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files


def on_config(config):
    docs = Path(config["docs_dir"])
    order = {stem: i for i, stem in enumerate(TUTORIAL_ORDER)}
    tutorials = sorted(docs.glob("tutorials/*.md"), key=lambda p: (order.get(p.stem, 99), p.stem))
    methods = sorted(docs.glob("methods/*.md"), key=lambda p: _title(p).lower())
    results = sorted(RESULTS.glob("*.md"))
    config["nav"] = [
        *[{title: page} for title, page in GUIDES if (docs / page).exists()],
        {"Tutorials": [{_title(p): f"tutorials/{p.name}"} for p in tutorials]},
        {"Methods": [{_title(p): f"methods/{p.name}"} for p in methods]},
        {"Benchmark results": [{p.stem: f"results/{p.name}"} for p in results]},
        {"API reference": [{f"fewflow.{m}": f"api/{m}.md"} for m in _api_modules()]},
    ]
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:
    depth = page.file.src_uri.count("/")
    return _RESULT_LINK.sub("](" + "../" * depth + "results/", markdown)
