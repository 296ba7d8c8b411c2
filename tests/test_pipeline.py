"""End to end on a tiny model and dataset: every stage, skipping, resuming and refusing mismatches."""

import json

import pytest

from bsharedrag.config import load_config
from bsharedrag.index import IndexMismatchError, VectorIndex
from bsharedrag.pipeline import Pipeline
from conftest import tiny_overrides


@pytest.fixture
def pipeline(tiny_model_dir, tiny_dataset, tmp_path):
    return Pipeline(load_config(overrides=tiny_overrides(tiny_model_dir, tiny_dataset, tmp_path / "run")))


def test_retrieval_half_end_to_end(pipeline):
    done = pipeline.run(("pretrain", "mine", "retriever", "index"))
    stats = done["pretrain"]["stats"]
    assert stats["heldout_perplexity_after"] > 0 and stats["steps"] >= 1
    assert (pipeline.folder("pretrain") / "model" / "config.json").exists()
    assert done["retriever"]["stats"]["steps"] == 3
    assert (pipeline.folder("retriever") / "adapter_config.json").exists()
    index = VectorIndex.open(pipeline.folder("index"))
    assert len(index) == 24
    assert index.manifest["adapter"] == done["retriever"]["id"]

    again = Pipeline(pipeline.config).run(("pretrain", "mine", "retriever", "index"))
    assert {s: m["id"] for s, m in again.items()} == {s: m["id"] for s, m in done.items()}  # all skipped

    changed = pipeline.config.model_copy(deep=True)
    changed.retriever.temperature = 0.1
    rerun = Pipeline(changed).run(("pretrain", "mine", "retriever", "index"))
    assert rerun["pretrain"]["id"] == done["pretrain"]["id"]
    assert rerun["retriever"]["id"] != done["retriever"]["id"]
    assert rerun["index"]["id"] != done["index"]["id"]  # built from the new adapter
    with pytest.raises(IndexMismatchError):
        VectorIndex.open(pipeline.folder("index"), expect={"adapter": done["retriever"]["id"]})
