"""bsharedrag: backbone-shared retrieval-augmented QA (BSharedRAG) on one causal language model.

The package is layered. Each row names a layer, its modules, and the layers (or modules) it may
import besides its own; `tests/test_layers.py` reads this table and checks every import statement
of the package against it, so the table is the rule:

    base:       config data distributed files memory progress text -> nothing
    metrics:    metrics                                   -> text
    catalogue:  catalogue                                 -> base
    synth:      synth                                     -> model base
    model:      model                                     -> base metrics
    train:      train                                     -> model base metrics
    run:        run                                       -> model base
    rag:        rag                                       -> run model base
    evaluate:   evaluate                                  -> rag run model base metrics
    efficiency: efficiency                                -> rag run base
    serving:    serving                                   -> rag run model base
    pipeline:   pipeline                                  -> train evaluate synth run model base
    report:     report                                    -> metrics base
    compare:    compare                                   -> pipeline evaluate efficiency run base
    cli:        cli __main__                              -> serving compare report pipeline evaluate rag run model base metrics catalogue synth

`model/` holds what inference needs (backbone, encoder, prompts, decoding, index, baselines), `train/`
what building the adapters needs; `run.Run` owns a run folder and loads what was built in it;
`pipeline.STAGES` is the table of stages that build it. Any module may import the package root for
`__version__`. Heavy modules (torch, transformers) load lazily, so `import bsharedrag` and
`bsharedrag --help` are fast.
"""

from __future__ import annotations

import importlib

__all__ = ["RAG", "Config", "Dataset", "Run", "SharedBackbone", "load_config", "load_dataset", "load_rag"]
__version__ = "0.1.0"

_LAZY = {
    "Config": "config",
    "load_config": "config",
    "Dataset": "data",
    "load_dataset": "data",
    "SharedBackbone": "model.backbone",
    "Run": "run",
    "RAG": "rag",
    "load_rag": "rag",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bsharedrag' has no attribute {name!r}")
