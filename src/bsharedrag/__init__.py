"""bsharedrag: backbone-shared retrieval-augmented QA (BSharedRAG) on one causal language model.

Heavy modules (torch, transformers) load lazily, so `import bsharedrag` and `bsharedrag --help` are fast.
"""

from __future__ import annotations

import importlib

__all__ = ["Config", "Dataset", "SharedBackbone", "load_config", "load_dataset"]
__version__ = "0.1.0"

_LAZY = {
    "Config": "config",
    "load_config": "config",
    "Dataset": "data",
    "load_dataset": "data",
    "SharedBackbone": "backbone",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bsharedrag' has no attribute {name!r}")
