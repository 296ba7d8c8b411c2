"""Progress bars for long work (tqdm; silent when BSHAREDRAG_NO_PROGRESS is set, e.g. in tests)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(iterable=None, quiet: bool = False, **kwargs):
    kwargs["disable"] = quiet or bool(os.environ.get("BSHAREDRAG_NO_PROGRESS"))
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
