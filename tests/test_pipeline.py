"""End to end on a tiny model and dataset: every stage, skipping, resuming and refusing mismatches."""

import json

import pytest

from bsharedrag.config import load_config
from bsharedrag.index import IndexMismatchError, VectorIndex
from bsharedrag.pipeline import Pipeline
from conftest import tiny_overrides, write_dataset


@pytest.fixture
def pipeline(tiny_model_dir, tiny_dataset, tmp_path):
    return Pipeline(load_config(overrides=tiny_overrides(tiny_model_dir, tiny_dataset, tmp_path / "run")))


def test_retrieval_half_end_to_end(pipeline):
    done = pipeline.run(("pretrain", "mine", "retriever", "index"))
    stats = done["pretrain"]["stats"]
    assert stats["heldout_perplexity_after"] > 0 and stats["steps"] >= 1
    assert (pipeline.folder("pretrain") / "model" / "config.json").exists()
    negatives = json.loads((pipeline.folder("mine") / "negatives.json").read_text())
    for query_id, mined in negatives.items():  # judged per product: the product's two other passages
        product = query_id.removesuffix("-q")
        assert sorted(mined) == [f"{product}-d1", f"{product}-d2"]
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


def test_whole_pipeline_then_cli_search_ask_and_eval(pipeline, tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from bsharedrag.cli import app

    pipeline.run()
    results = json.loads((pipeline.folder("eval") / "results.json").read_text())
    assert set(results["retrieval"]) == {"bsharedrag", "bm25"}
    assert 0.0 <= results["retrieval"]["bm25"]["hit@3"] <= 1.0
    assert set(results["generation"]) == {"bsharedrag", "zero_shot"}
    assert {"bleu3", "rougeL", "bertscore", "citation_precision"} <= set(results["generation"]["bsharedrag"])

    runner = CliRunner()
    run = str(pipeline.run_dir)
    found = runner.invoke(app, ["search", "Acme Kettle 1.7L: how long to boil?", "--run", run, "-k", "2"])
    assert found.exit_code == 0, found.output
    assert "p1-d" in found.output or "-d" in found.output

    asked = runner.invoke(app, ["ask", "does the kettle have a steel lid?", "--run", run, "--max-new-tokens", "4"])
    assert asked.exit_code == 0, asked.output
    assert "[1]" in asked.output  # the passages list

    output = tmp_path / "other.json"
    evaluated = runner.invoke(app, ["eval", "--run", run, "--data", str(tiny_dataset), "--split", "train",
                                    "--output", str(output), "--set", "eval.generation=false"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(output.read_text())["split"] == "train"
    assert "| bsharedrag |" in evaluated.output
    assert json.loads(output.read_text())["data_losses"] == {"skipped_lines": [], "dropped_judgements": 0,
                                                            "dropped_queries": 0}

    broken = write_dataset(tmp_path / "broken", broken_line=True)
    with (broken / "qrels" / "train.tsv").open("a") as handle:
        handle.write("p1-q\tbroken\t1\n")  # judges the passage on the broken line
    lossy = runner.invoke(app, ["eval", "--run", run, "--data", str(broken), "--split", "train",
                                "--output", str(output), "--set", "eval.generation=false"])
    assert lossy.exit_code == 0, lossy.output
    losses = json.loads(output.read_text())["data_losses"]
    assert losses["dropped_judgements"] == 1 and losses["skipped_lines"][0].startswith(f"{broken / 'corpus.jsonl'}:3")
    assert "skipped 1 malformed line(s) and dropped 1 judgement(s)" in lossy.output

    empty = runner.invoke(app, ["ask", "   ", "--run", run])
    assert empty.exit_code == 1 and "question" in empty.output
