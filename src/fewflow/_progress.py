"""One progress-bar factory: tqdm that refreshes often on a terminal and rarely in a log file."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(iterable: Any = None, **kw: Any) -> Any:
    """``tqdm(iterable, **kw)``; when stderr is not a terminal (CI, a log file) it updates at most every
    10 seconds so logs are not flooded with carriage-return frames."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kw.setdefault("mininterval", 10.0)
        kw.setdefault("ncols", 100)
    else:
        kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
