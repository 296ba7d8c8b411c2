"""Content hashes of input files, and writes that a kill never leaves half done."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["file_hash", "remove_path", "replacing", "write_text_atomic"]


def file_hash(*paths: Path) -> str:
    """A short hash of the bytes of `paths`, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def remove_path(path: Path) -> None:
    """Remove a file, a link (not what it points at) or a folder tree; nothing where there is none."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a sibling path to write the new `target` at (a file or a folder); on success it takes
    `target`'s place in one rename, so a kill mid-write leaves the old `target` (or none), never half a new one."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    remove_path(partial)
    try:
        yield partial
    except BaseException:
        remove_path(partial)
        raise
    if partial.is_dir() and target.exists():
        remove_path(target)  # a rename cannot replace a folder that has content
    os.replace(partial, target)


def write_text_atomic(path: Path, text: str) -> None:
    with replacing(path) as partial:
        partial.write_text(text, encoding="utf-8")
