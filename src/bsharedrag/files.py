"""Content hashes of input files, and writes that a kill never leaves half done."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["file_hash", "remove_path", "replacing", "settle", "settled", "swap_in", "write_text_atomic"]


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


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def swap_in(new: Path, target: Path) -> None:
    """Put the finished `new` (a file or a folder) at `target`, replacing what is there.

    A rename cannot replace a folder that has content, so an old folder (or a link to one) is first
    renamed aside; a kill between the two renames is completed by `settle(target, new)`.
    """
    if not (new.is_dir() and _exists(target)):
        os.replace(new, target)
        return
    aside = _aside(target)
    target.rename(aside)  # a link moves, not the folder it points at
    new.rename(target)
    remove_path(aside)


def settle(target: Path, new: Path) -> Path:
    """Complete a `swap_in(new, target)` that a kill interrupted; returns `target`.

    The old one is only ever aside while `new` is finished, so a missing `target` takes `new`.
    """
    aside = _aside(target)
    if _exists(aside):
        if not _exists(target):
            new.rename(target)
        remove_path(aside)
    return target


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a sibling path to write the new `target` at (a file or a folder); on success it takes
    `target`'s place, so a kill mid-write leaves the old `target` (or none), never half a new one."""
    target = Path(target)
    partial = _partial(target)
    settle(target, partial)
    remove_path(partial)
    try:
        yield partial
    except BaseException:
        remove_path(partial)
        raise
    swap_in(partial, target)


def settled(target: Path) -> Path:
    """`target` after completing an interrupted `replacing(target)`: call it before reading a folder target."""
    target = Path(target)
    return settle(target, _partial(target))


def _partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def write_text_atomic(path: Path, text: str) -> None:
    with replacing(path) as partial:
        partial.write_text(text, encoding="utf-8")
