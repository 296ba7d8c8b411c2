import pytest

from bsharedrag.config import load_config


def test_profile_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retriever:\n  lr: 0.001\n  temperature: 0.05\n")
    config = load_config(path, ["retriever.lr=0.002"])
    assert config.retriever.lr == 0.002 and config.retriever.temperature == 0.05
    assert config.retriever.max_steps is not None  # from the quick profile
    assert load_config(overrides=["profile=full"]).retriever.max_steps is None


def test_overrides_name_the_embedded_datasets_as_files_do():
    config = load_config(overrides=['retriever.datasets=[{path: DATASETS/epqa, judged_per_product: true}]'])
    (ref,) = config.retriever.datasets
    assert (ref.path / "corpus.jsonl").exists() and ref.judged_per_product and ref.split == "train"


def test_an_unknown_key_is_an_error_that_suggests_the_nearest_setting():
    with pytest.raises(ValueError, match=r"retriever.temprature: no such setting; did you mean `retriever.temperature`"):
        load_config(overrides=["retriever.temprature=0.1"])
    with pytest.raises(ValueError, match=r"zzz: no such setting \(known: profile, "):
        load_config(overrides=["zzz=1"])


def test_bad_values_are_refused_with_the_value():
    with pytest.raises(ValueError, match="micro_batch_size"):
        load_config(overrides=["retriever.batch_size=8", "retriever.micro_batch_size=3"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(overrides=["nonsense"])


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("retriever:\n  temperature: 0.05\n  lr: [1e-4\n")
    with pytest.raises(ValueError, match=rf"{path}:\d+:\d+: malformed YAML"):
        load_config(path)
    with pytest.raises(ValueError, match=r"override 'retriever.lr=\[1'.*malformed YAML"):
        load_config(overrides=["retriever.lr=[1"])


def test_the_cli_reports_malformed_yaml_as_an_error_line(tmp_path):
    from typer.testing import CliRunner

    from bsharedrag.cli import app

    path = tmp_path / "broken.yaml"
    path.write_text("eval: {systems: [bm25\n")
    result = CliRunner().invoke(app, ["eval", "--config", str(path), "--run", str(tmp_path / "run")])
    assert result.exit_code == 1 and "error:" in result.output and f"{path}:" in result.output
    assert "Traceback" not in result.output


def test_reports_name_the_embedded_datasets_portably(tmp_path, monkeypatch):
    from bsharedrag.config import _PACKAGE_DATA, portable_path

    monkeypatch.chdir(tmp_path)
    assert portable_path(_PACKAGE_DATA / "epqa") == "DATASETS/epqa"
    assert portable_path("/elsewhere/src/bsharedrag/datasets/hetpqa") == "DATASETS/hetpqa"  # another machine's checkout
    assert portable_path(tmp_path / "shop") == "shop"
    assert portable_path("/data/shop") == "/data/shop"


def test_a_run_folder_config_that_names_a_moved_setting_still_loads(tmp_path):
    saved = tmp_path / "config.yaml"  # what runs built before the fusion settings moved to `index` recorded
    saved.write_text("eval:\n  fusion: interpolate\n  fusion_validation_queries: 50\n")
    config = load_config(saved)
    assert (config.index.fusion, config.index.fusion_validation_queries) == ("interpolate", 50)
    assert load_config(saved, ["index.fusion=rrf"]).index.fusion == "rrf"  # the new name wins


def test_the_index_kind_records_only_its_own_parameters():
    assert load_config(overrides=["index.kind=hnsw"]).index.faiss_spec() == {
        "kind": "hnsw", "hnsw_neighbors": 32, "hnsw_ef_search": 128}
    assert load_config().index.faiss_spec() == {"kind": "flat"}
    with pytest.raises(ValueError, match="index.kind"):
        load_config(overrides=["index.kind=annoy"])
