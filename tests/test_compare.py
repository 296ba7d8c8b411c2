"""The comparison on a tiny model: every system builds, is evaluated, answers, and reuses what it can."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from bsharedrag.compare import compare, system_config, systems
from bsharedrag.config import CompareConfig, Config, LoraSettings, RetrieverConfig, load_config
from bsharedrag.rag import load_rag
from conftest import tiny_overrides

SYSTEMS = ["bsharedrag", "separate", "fully_shared", "no_cpt", "random_negatives", "no_passages", "top1"]


def test_systems_expand_the_sweep_and_reject_unknown_names():
    chosen = systems(CompareConfig(systems=["bsharedrag", "fully_shared", "top5", "fully_shared-l0.3"], lambdas=[0.1, 2]))
    assert [s.name for s in chosen] == ["bsharedrag", "fully_shared-l0.1", "fully_shared-l2", "top5",
                                        "fully_shared-l0.3"]
    assert chosen[4].weight == 0.3 and chosen[4].overrides["fully_shared_lambda"] == 0.3
    assert [s.weight for s in chosen[1:3]] == [0.1, 2.0] and chosen[3].top_k == 5
    assert not chosen[3].measures_efficiency
    with pytest.raises(ValueError, match="unknown system 'colbert'"):
        systems(CompareConfig(systems=["colbert"]))
    with pytest.raises(ValueError, match="twice"):
        systems(CompareConfig(systems=["top1", "top1"]))


def test_system_config_applies_overrides_in_its_own_folder(tmp_path):
    base = load_config(overrides=[f"run_dir={tmp_path}"])
    separate = next(s for s in systems(CompareConfig(systems=["separate"])))
    config = system_config(base, separate)
    assert config.architecture == "separate" and config.pretrain.enabled is False
    assert config.run_dir == tmp_path / "systems" / "separate"
    assert base.architecture == "backbone_shared"  # the base config is untouched


def test_retrieval_loss_weight_scales_the_gradient(tiny_model_dir):
    from bsharedrag.model.backbone import SharedBackbone
    from bsharedrag.config import BackboneConfig
    from bsharedrag.data import Document
    from bsharedrag.model.encoder import Encoder
    from bsharedrag.train.retriever import TrainingExample, contrastive_step

    backbone = SharedBackbone.load(BackboneConfig(model=str(tiny_model_dir), precision="fp32"))
    backbone.add_adapter("retriever", LoraSettings(r=4, alpha=8))
    params = backbone.train_adapter("retriever")
    settings = RetrieverConfig(micro_batch_size=1, batch_size=2, negatives_per_query=0)
    batch = [TrainingExample(f"question {i}", (Document(f"d{i}", "", f"passage {i}"),), ()) for i in range(2)]
    for p in params:  # LoRA B starts at zero; make A's gradient non-zero too
        torch.nn.init.normal_(p, std=0.02)

    def grads(weight):
        for p in params:
            p.grad = None
        loss = contrastive_step(Encoder(backbone, settings), batch, settings, random.Random(0), weight=weight)
        return loss, torch.cat([p.grad.flatten() for p in params])

    loss_one, one = grads(1.0)
    loss_three, three = grads(3.0)
    assert loss_one == pytest.approx(loss_three)  # the unweighted loss is returned
    assert torch.allclose(three, 3 * one, rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    from conftest import write_dataset

    root = tmp_path_factory.mktemp("compare")
    data = write_dataset(root / "shop")
    overrides = tiny_overrides(tiny_model_dir, data, root / "run") + [
        f"compare.systems={json.dumps(SYSTEMS)}", "compare.lambdas=[0.5,2.0]",
        f'compare.generalisation=[{{"path": "{data}", "split": "train", "max_queries": 4}}]',
        "compare.efficiency_queries=3", "compare.efficiency_answers=1",
        "eval.max_generation_queries=2",
    ]
    config = load_config(overrides=overrides)
    return config, compare(config, command="pytest")


def test_every_system_is_evaluated_on_both_datasets(compared):
    config, results = compared
    names = ["bsharedrag", "separate", "fully_shared-l0.5", "fully_shared-l2", "no_cpt", "random_negatives",
             "no_passages", "top1"]
    assert list(results["systems"]) == names[:1] + ["bm25", "encoder", "zero_shot"] + names[1:]
    assert set(results["datasets"]) == {"shop-dev", "shop-train"}
    assert results["datasets"]["shop-train"]["queries"] == 4
    for name in names:
        entry = results["systems"][name]
        for dataset in ("shop-dev", "shop-train"):
            assert 0 <= entry["eval"][dataset]["retrieval"]["hit@3"] <= 1, (name, dataset)
            assert "rougeL" in entry["eval"][dataset]["generation"], (name, dataset)
        assert ("efficiency" in entry) == (name != "top1")
    assert set(results["systems"]["bm25"]["eval"]["shop-dev"]) == {"retrieval"}
    assert set(results["systems"]["zero_shot"]["eval"]["shop-dev"]) == {"generation"}
    efficiency = results["systems"]["bsharedrag"]["efficiency"]
    assert efficiency["peak_rss_mib"] > 0 and efficiency["query_ms_p50"] <= efficiency["query_ms_p95"]
    assert json.loads((config.run_dir / "compare.json").read_text()) == results


def test_systems_adopt_shared_artefacts(compared):
    config, _ = compared
    systems_dir = config.run_dir / "systems"
    top1 = systems_dir / "top1"
    assert all((top1 / stage).is_symlink() for stage in ("pretrain", "mine", "retriever", "index", "generator"))
    assert (top1 / "retriever").resolve() == (systems_dir / "bsharedrag" / "retriever").resolve()
    no_passages = systems_dir / "no_passages"
    assert (no_passages / "index").is_symlink() and not (no_passages / "generator").is_symlink()
    assert (systems_dir / "no_cpt" / "pretrain").resolve() == (systems_dir / "separate" / "pretrain").resolve()
    shared = json.loads((systems_dir / "fully_shared-l2" / "generator" / "manifest.json").read_text())
    assert shared["stats"]["shared_with"] == "retriever"
    random_negatives = json.loads((systems_dir / "random_negatives" / "mine" / "manifest.json").read_text())
    assert random_negatives["settings"]["random_negatives"] is True


def test_each_system_answers_from_its_run_folder(compared):
    config, results = compared
    for name in ("separate", "fully_shared-l0.5", "no_passages"):
        sub = load_config(config.run_dir / "systems" / name / "config.yaml")
        rag = load_rag(sub)
        answer = rag.ask("Acme Kettle 1.7L: how long does it take to boil?", max_new_tokens=4)
        assert isinstance(answer.text, str)
        expected_passages = 0 if name == "no_passages" else sub.generator.top_k
        assert len(answer.passages) == expected_passages
    separate = load_rag(load_config(config.run_dir / "systems" / "separate" / "config.yaml"))
    assert type(separate.retriever.encoder).__name__ == "SentenceEncoder"
    assert separate.adapter == "generator" and separate.backbone.adapters == ["generator"]
    shared = load_rag(load_config(config.run_dir / "systems" / "fully_shared-l2" / "config.yaml"))
    assert shared.adapter == "retriever" and shared.backbone.adapters == ["retriever"]


def test_a_second_compare_reuses_everything(compared):
    config, results = compared
    manifests = sorted(config.run_dir.glob("systems/*/compare/*/manifest.json"))
    before = {path: json.loads(path.read_text())["id"] for path in manifests}
    again = compare(config, command="pytest")
    after = {path: json.loads(path.read_text())["id"] for path in manifests}
    assert after == before
    assert again["systems"]["bsharedrag"]["eval"] == results["systems"]["bsharedrag"]["eval"]


def test_a_compare_keeps_results_recorded_with_the_same_settings(compared, tmp_path):
    config, results = compared
    moved = tmp_path / "elsewhere"  # another run folder, as on another machine: only compare.json travels
    moved.mkdir()
    shutil.copy(config.run_dir / "compare.json", moved / "compare.json")
    again = compare(config.model_copy(update={"run_dir": moved}), command="pytest")
    assert not (moved / "systems").exists()  # nothing was built
    assert again["systems"] == results["systems"] and again["datasets"] == results["datasets"]


def test_a_stopped_compare_loses_no_recorded_result(compared, monkeypatch):
    import bsharedrag.compare as compare_module

    config, results = compared
    path = config.run_dir / "compare.json"
    saved = path.read_text()
    doctored = json.loads(saved)
    for name in ("separate", "no_cpt"):  # as if their settings had changed since: both are redone
        doctored["systems"][name]["key"] = "earlier settings"
    path.write_text(json.dumps(doctored))
    evaluation = compare_module._evaluation

    def stopped_at_no_cpt(pipeline, system, *args):
        if system.name == "no_cpt":
            raise KeyboardInterrupt
        return evaluation(pipeline, system, *args)

    monkeypatch.setattr(compare_module, "_evaluation", stopped_at_no_cpt)
    listed = config.compare.model_copy(update={"systems": ["separate", "no_cpt", "top1"]})
    try:
        with pytest.raises(KeyboardInterrupt):
            compare(config.model_copy(update={"compare": listed}), command="pytest")
        written = json.loads(path.read_text())
    finally:
        path.write_text(saved)
    assert set(written["systems"]) == set(results["systems"]) - {"no_cpt"}  # unlisted systems are kept too
    assert written["systems"]["separate"]["eval"] == results["systems"]["separate"]["eval"]
    assert written["systems"]["separate"]["key"] == results["systems"]["separate"]["key"]


def test_the_system_key_names_datasets_by_content_not_place(compared, tmp_path):
    from bsharedrag.compare import _system_key, systems

    config, _ = compared
    system = systems(config.compare)[0]
    data = Path(config.eval.data)
    copy = shutil.copytree(data, tmp_path / "copy")
    datasets = [("shop-dev", data, "dev", None)]
    key = _system_key(config, system, datasets)
    moved = json.loads(config.model_dump_json().replace(str(data), str(copy)))
    assert _system_key(Config.model_validate(moved), system, [("shop-dev", copy, "dev", None)]) == key
    changed = config.model_copy(update={"retriever": config.retriever.model_copy(update={"temperature": 0.5})})
    assert _system_key(changed, system, datasets) != key


def test_the_report_renders_from_the_compare_results(compared, tmp_path):
    from typer.testing import CliRunner

    from bsharedrag.cli import app

    config, _ = compared
    done = CliRunner().invoke(app, ["report", str(config.run_dir), "--output", str(tmp_path / "report")])
    assert done.exit_code == 0, done.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "fully_shared-l0.5" in text and (tmp_path / "report" / "lambda-sweep.png").exists()
