"""Artefact folders of a run: each records what made it, and is up to date while its inputs are.

A stage folder holds `manifest.json` once the stage has finished: the stage's settings, its
inputs (the ids of upstream artefacts, dataset hashes), a fingerprint of both, statistics and a
fresh `id`. Downstream artefacts record upstream ids, so rebuilding an upstream artefact makes
everything built from it stale. An unfinished folder holds `pending.json` with the fingerprint
it was started for; a restart with the same fingerprint resumes from the stage's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

from .config import fingerprint

__all__ = ["Artefact", "file_hash"]

MANIFEST = "manifest.json"
_PENDING = "pending.json"


def file_hash(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class Artefact:
    """One stage's output folder inside the run folder."""

    def __init__(self, folder: Path, settings: dict, inputs: dict):
        self.folder = Path(folder)
        self.settings = settings
        self.inputs = inputs
        self.fingerprint = fingerprint(settings, inputs)

    @property
    def manifest(self) -> dict | None:
        path = self.folder / MANIFEST
        return json.loads(path.read_text()) if path.exists() else None

    def is_fresh(self) -> bool:
        manifest = self.manifest
        return manifest is not None and manifest.get("fingerprint") == self.fingerprint

    def start(self) -> None:
        """Prepare the folder: keep a matching unfinished attempt (to resume), wipe anything else."""
        pending = self.folder / _PENDING
        resumable = pending.exists() and json.loads(pending.read_text()).get("fingerprint") == self.fingerprint
        if not resumable:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)
        pending.write_text(json.dumps({"fingerprint": self.fingerprint, "started": time.time()}))

    def finish(self, stats: dict, **extra) -> dict:
        manifest = {
            "id": uuid.uuid4().hex[:16],
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "inputs": self.inputs,
            "stats": stats,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        (self.folder / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=2, default=str))
        (self.folder / (MANIFEST + ".tmp")).replace(self.folder / MANIFEST)
        (self.folder / _PENDING).unlink(missing_ok=True)
        return manifest
