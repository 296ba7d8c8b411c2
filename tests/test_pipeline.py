"""End to end on a tiny model and dataset: every stage, skipping, resuming and refusing mismatches."""

import json

import pytest

from bsharedrag.config import load_config
from bsharedrag.model.encoder import DenseRetriever
from bsharedrag.model.hybrid import HybridRetriever
from bsharedrag.model.index import IndexMismatchError, VectorIndex
from bsharedrag.pipeline import run_stages
from bsharedrag.run import Run
from conftest import tiny_overrides, write_dataset


@pytest.fixture
def run(tiny_model_dir, tiny_dataset, tmp_path):
    return Run(load_config(overrides=tiny_overrides(tiny_model_dir, tiny_dataset, tmp_path / "run")))


def test_retrieval_half_end_to_end(run, caplog):
    done = run_stages(run, ("pretrain", "mine", "retriever", "index"))
    stats = done["pretrain"]["stats"]
    assert stats["heldout_perplexity_after"] > 0 and stats["steps"] >= 1
    assert all(manifest["stats"]["peak_rss_mib"] > 0 for manifest in done.values())  # each stage's own peak
    assert (run.stage_folder("pretrain") / "model" / "config.json").exists()
    negatives = json.loads((run.stage_folder("mine") / "negatives.json").read_text())
    for query_id, mined in negatives.items():  # judged per product: the product's two other passages
        product = query_id.removesuffix("-q")
        assert sorted(mined) == [f"{product}-d1", f"{product}-d2"]
    assert done["retriever"]["stats"]["steps"] == 3
    assert (run.stage_folder("retriever") / "adapter_config.json").exists()
    index = VectorIndex.open(run.stage_folder("index"))
    assert len(index) == 24
    assert index.manifest["adapter"] == done["retriever"]["id"]
    fusion = index.manifest["fusion"]  # the served first stage's weight, chosen on the catalogue's train questions
    assert fusion["validation"] == "train split" and fusion["questions"] == 6 and 0 <= fusion["weight"] <= 1
    assert isinstance(run.first_stage(), HybridRetriever) and run.first_stage().weight == fusion["weight"]
    dense_only = Run(run.config.model_copy(update={"index": run.config.index.model_copy(update={"first_stage": "dense"})}))
    assert isinstance(dense_only.first_stage(), DenseRetriever)
    del index.manifest["fusion"]
    index.save()  # an index built before hybrid retrieval: served dense, with a warning that says how to rebuild
    with caplog.at_level("WARNING"):
        assert isinstance(Run(run.config).first_stage(), DenseRetriever)
    assert "bsharedrag index --force" in caplog.text

    again = run_stages(Run(run.config), ("pretrain", "mine", "retriever", "index"))
    assert {s: m["id"] for s, m in again.items()} == {s: m["id"] for s, m in done.items()}  # all skipped

    changed = run.config.model_copy(deep=True)
    changed.retriever.temperature = 0.1
    rerun = run_stages(Run(changed), ("pretrain", "mine", "retriever", "index"))
    assert rerun["pretrain"]["id"] == done["pretrain"]["id"]
    assert rerun["retriever"]["id"] != done["retriever"]["id"]
    assert rerun["index"]["id"] != done["index"]["id"]  # built from the new adapter
    with pytest.raises(IndexMismatchError):
        VectorIndex.open(run.stage_folder("index"), expect={"adapter": done["retriever"]["id"]})

    forced = run_stages(Run(changed), ("pretrain", "mine", "retriever", "index"), rebuild=("index",))
    assert {s: forced[s]["id"] for s in ("pretrain", "mine", "retriever")} == {
        s: rerun[s]["id"] for s in ("pretrain", "mine", "retriever")}  # only the named stage is rebuilt
    assert forced["index"]["id"] != rerun["index"]["id"]
    assert (run.stage_folder("pretrain") / "model" / "config.json").exists()


def test_whole_pipeline_then_cli_search_ask_and_eval(run, tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from bsharedrag.cli import app

    built = run_stages(run)
    # pre-training ended each passage with the token the retriever pools on, and the run embeds with it
    assert built["pretrain"]["stats"]["document_end"] == built["retriever"]["end_token"] == "<|im_end|>"
    tokenizer = run.backbone().tokenizer
    assert run.encoder().end_id == tokenizer.eos_token_id
    results = json.loads((run.stage_folder("eval") / "results.json").read_text())
    assert set(results["retrieval"]) == {"bsharedrag", "bm25"}
    assert results["generation_passages"] == "hybrid"  # what `ask` serves (index.first_stage), scored or not
    assert 0.0 <= results["retrieval"]["bm25"]["hit@3"] <= 1.0
    assert set(results["generation"]) == {"bsharedrag", "zero_shot"}
    assert {"bleu3", "rougeL", "bertscore", "citation_precision"} <= set(results["generation"]["bsharedrag"])
    low, high = results["intervals"]["retrieval"]["bm25"]["hit@3"]  # a 95% bootstrap interval around the mean
    assert low <= results["retrieval"]["bm25"]["hit@3"] <= high
    per_query = results["per_query"]["generation"]["bsharedrag"]  # the scores the means come from
    assert len(per_query) == results["generation_queries"] and "bleu3" in next(iter(per_query.values()))

    runner = CliRunner()
    folder = str(run.folder)
    found = runner.invoke(app, ["search", "Acme Kettle 1.7L: how long to boil?", "--run", folder, "-k", "2"])
    assert found.exit_code == 0, found.output
    assert "p1-d" in found.output or "-d" in found.output
    assert "product" in found.stdout and "Loading" not in found.stdout  # logs and bars go to standard error

    refused = runner.invoke(app, ["search", "kettle?", "--run", folder, "--set", "retriever.temperature=0.5"])
    assert refused.exit_code == 1 and "retriever.temperature=" in refused.output and "(given 0.5)" in refused.output
    applied = runner.invoke(app, ["search", "kettle?", "--run", folder, "--set", "serve.port=9999"])
    assert applied.exit_code == 0, applied.output  # a setting no stage was built with applies
    manifest_file = run.stage_folder("generator") / "manifest.json"
    saved = manifest_file.read_text()
    manifest_file.write_text(json.dumps({**json.loads(saved), "fingerprint": "built-by-older-code"}))
    upgraded = runner.invoke(app, ["search", "kettle?", "--run", folder, "--set", "serve.port=9999"])
    assert upgraded.exit_code == 0, upgraded.output  # a stage older code built refuses no unrelated setting
    manifest_file.write_text(saved)
    retriever_file = run.stage_folder("retriever") / "manifest.json"
    saved = retriever_file.read_text()
    retriever_file.write_text(json.dumps({**json.loads(saved), "end_token": "<|endoftext|>"}))
    assert Run.open(run.folder).encoder().end_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")  # as trained
    retriever_file.write_text(json.dumps({key: value for key, value in json.loads(saved).items() if key != "end_token"}))
    assert Run.open(run.folder).encoder().end_id == tokenizer.eos_token_id  # trained before the token was recorded
    retriever_file.write_text(saved)
    asked = runner.invoke(app, ["ask", "does the kettle have a steel lid?", "--run", folder, "--max-new-tokens", "4"])
    assert asked.exit_code == 0, asked.output
    assert "[1]" in asked.output and "(* cited in the answer)" in asked.stdout  # the passages list

    shop = tmp_path / "own-catalogue"  # the README's "your own catalogue": the run's index rebuilt over another corpus
    shop.mkdir()
    (shop / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"shop-{n}", "title": "Shop kettle", "text": text,
                                                           "product_id": "SKU-1"}) + "\n"
                                               for n, text in enumerate(["steel lid", "boils in 3 minutes"])))
    reindexed = runner.invoke(app, ["index", "--run", folder, "--set", f"index.corpus={shop}", "--set", "index.kind=hnsw"])
    assert reindexed.exit_code == 0, reindexed.output
    assert json.loads((run.index_folder / "index.json").read_text())["faiss"]["kind"] == "hnsw"  # recorded, and served
    shop_hits = runner.invoke(app, ["search", "kettle lid?", "--run", folder, "--product-id", "SKU-1",
                                    "--set", "index.kind=hnsw"])
    assert shop_hits.exit_code == 0 and "shop-0" in shop_hits.stdout and "SKU-1" in shop_hits.stdout
    assert runner.invoke(app, ["index", "--run", folder, "--set", f"index.corpus={run.config.index.corpus}"]).exit_code == 0

    output = tmp_path / "other.json"
    evaluated = runner.invoke(app, ["eval", "--run", folder, "--data", str(tiny_dataset), "--split", "train",
                                    "--output", str(output), "--set", "eval.generation=false",
                                    "--set", "eval.systems=[bsharedrag, bm25, hybrid]"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(output.read_text())["split"] == "train"
    fusion = json.loads(output.read_text())["fusion"]["hybrid"]  # evaluated on train: weighed on pseudo-queries
    assert fusion["validation"].startswith("pseudo-queries") and 0 <= fusion["weight"] <= 1
    assert "| hybrid |" in evaluated.stdout
    assert "| bsharedrag |" in evaluated.output
    assert evaluated.stdout.lstrip().startswith("retrieval (")  # the results alone: the logs went to stderr
    counted = runner.invoke(app, ["eval", "--run", folder, "--data", str(tiny_dataset), "--split", "train",
                                  "--output", str(output), "--set", "eval.max_generation_queries=1",
                                  "--set", "eval.faithfulness=true"])
    assert counted.exit_code == 0, counted.output
    assert "generation (" in counted.stdout and ", 1 queries;" in counted.stdout  # the count it was computed on
    probes = json.loads(output.read_text())["faithfulness"]
    assert probes["withheld_queries"] == 1 and 0 <= probes["answered_without_support"] <= 1
    assert "faithfulness (bsharedrag): withheld_queries 1" in counted.stdout
    assert json.loads(output.read_text())["data_losses"] == {"skipped_lines": [], "dropped_judgements": 0,
                                                            "dropped_queries": 0}

    broken = write_dataset(tmp_path / "broken", broken_line=True)
    with (broken / "qrels" / "train.tsv").open("a") as handle:
        handle.write("p1-q\tbroken\t1\n")  # judges the passage on the broken line
    lossy = runner.invoke(app, ["eval", "--run", folder, "--data", str(broken), "--split", "train",
                                "--output", str(output), "--set", "eval.generation=false"])
    assert lossy.exit_code == 0, lossy.output
    losses = json.loads(output.read_text())["data_losses"]
    assert losses["dropped_judgements"] == 1 and losses["skipped_lines"][0].startswith(f"{broken / 'corpus.jsonl'}:3")
    assert "skipped 1 malformed line(s) and dropped 1 judgement(s)" in lossy.output

    empty = runner.invoke(app, ["ask", "   ", "--run", folder])
    assert empty.exit_code == 1 and "question" in empty.output



def test_a_bare_corpus_trains_both_adapters_on_synthetic_questions(tiny_model_dir, tmp_path, monkeypatch):
    """The README's catalogue without labelled questions: pretrain, synth, mine, both adapters, index, eval."""
    from bsharedrag import synth

    shop = write_dataset(tmp_path / "labelled")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "corpus.jsonl").write_text((shop / "corpus.jsonl").read_text(encoding="utf-8"), encoding="utf-8")

    def scripted_writer(source, settings):  # a random tiny model writes nothing parsable: script the writer
        assert source == tiny_model_dir  # the backbone writes by default
        counter = iter(range(10**6))

        def write(prompts):
            passages = [user.split("\n")[1] for _, user in prompts]  # the line after "Product information:"
            return [f"Q: Tell me about {text.partition(': ')[0]}, point {next(counter)}?\nA: {text.partition(': ')[2]}"
                    for text in passages]

        return write

    monkeypatch.setattr(synth, "_local_writer", scripted_writer)
    overrides = tiny_overrides(tiny_model_dir, bare, tmp_path / "run") + [
        "synth.enabled=true", "synth.duplicate=1.0", "synth.validation_fraction=0.3",
        "retriever.datasets=[{path: SYNTH, split: train}]", "generator.datasets=[{path: SYNTH, split: train}]",
        "eval.data=SYNTH", "eval.split=dev",
    ]
    built = run_stages(Run(load_config(overrides=overrides)))
    assert built["synth"]["stats"]["train"] > 10 and built["synth"]["stats"]["dev"] > 3
    assert built["retriever"]["stats"]["steps"] == 3 and built["generator"]["stats"]["steps"] == 2
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["queries"] == built["synth"]["stats"]["dev"] and "bsharedrag" in results["generation"]
    again = run_stages(Run.open(tmp_path / "run"))
    assert again["synth"]["id"] == built["synth"]["id"]  # up to date: nothing is written twice


def test_a_setting_added_later_leaves_the_fingerprint_alone_at_the_value_earlier_code_behaved_as():
    from bsharedrag.config import PretrainConfig
    from bsharedrag.pipeline import _settings

    assert "document_end" not in _settings(PretrainConfig())  # artefacts built before it stay up to date
    assert _settings(PretrainConfig(document_end="end_of_text"))["document_end"] == "end_of_text"


def test_a_stage_seed_retrains_that_stage_alone(tiny_model_dir, tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tiny_dataset, tmp_path / "base")
    stages = ("pretrain", "mine", "retriever", "index", "generator")
    base = run_stages(Run(load_config(overrides=overrides)), stages)
    reseeded = Run(load_config(overrides=[*overrides, f"run_dir={tmp_path / 'reseeded'}", "generator.seed=7"]),
                   reuse=[tmp_path / "base"])
    built = run_stages(reseeded, stages)
    assert all(built[name]["id"] == base[name]["id"] for name in stages[:-1])  # adopted: the run's seed is unchanged
    assert built["generator"]["id"] != base["generator"]["id"]
    record = json.loads((reseeded.stage_folder("generator") / "training.json").read_text())
    assert record["seed"] == 7 and base["generator"]["stats"]["first_loss"] != built["generator"]["stats"]["first_loss"]
