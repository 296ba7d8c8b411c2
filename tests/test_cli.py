"""The CLI's stage commands: `--force` rebuilds the named stage only, `--force-upstream` its upstream too."""

import pytest
from typer.testing import CliRunner

from bsharedrag import cli


@pytest.mark.parametrize(("flags", "rebuilt"), [
    ([], ()),
    (["--force"], ("index",)),
    (["--force-upstream"], ("pretrain", "synth", "mine", "retriever", "index")),
])
def test_a_stage_command_rebuilds_what_its_flags_name(flags, rebuilt, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_stages", lambda run, stages, rebuild: calls.append((stages, tuple(rebuild))) or {})
    result = CliRunner().invoke(cli.app, ["index", "--run", str(tmp_path / "run"), *flags])
    assert result.exit_code == 0, result.output
    assert calls == [(("pretrain", "synth", "mine", "retriever", "index"), rebuilt)]


@pytest.mark.parametrize("command", [["search", "kettle?"], ["ask", "kettle?"], ["eval"], ["docs", "rm", "d1"]])
def test_a_command_on_a_missing_run_folder_says_so(command, tmp_path):
    result = CliRunner().invoke(cli.app, [*command, "--run", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert f"no run folder {tmp_path / 'nowhere'}" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", [["search", "kettle?", "-k", "0"], ["ask", "kettle?", "--top-k", "-1"]])
def test_a_top_k_below_one_is_refused_before_anything_loads(command, tmp_path):
    result = CliRunner().invoke(cli.app, [*command, "--run", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "--top-k" in result.output  # a usage error: the run folder was never opened


def test_a_misspelt_setting_is_answered_with_the_nearest_real_one(tmp_path):
    result = CliRunner().invoke(cli.app, ["index", "--run", str(tmp_path / "run"), "--set", "retriever.temprature=0.05"])
    assert result.exit_code == 1
    assert "did you mean `retriever.temperature`?" in result.output and "pydantic" not in result.output


@pytest.mark.parametrize("make", ["nothing", "empty folder"])
def test_report_without_a_comparison_says_what_to_run(make, tmp_path):
    folder = tmp_path / "compare"
    if make == "empty folder":
        folder.mkdir()
    result = CliRunner().invoke(cli.app, ["report", str(folder)])
    assert result.exit_code == 1 and f"bsharedrag compare --run {folder}" in result.output
    assert "Errno" not in result.output


def test_stage_statistics_print_as_a_table_and_logs_go_to_standard_error(tmp_path, monkeypatch):
    def built(run, stages, rebuild):
        cli.logging.getLogger("bsharedrag.pipeline").info("a log line")
        return {"mine": {"stats": {"queries": 3, "mean_negatives": 2.3333333}}}

    monkeypatch.setattr(cli, "run_stages", built)
    result = CliRunner().invoke(cli.app, ["mine", "--run", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "queries 3, mean_negatives 2.333" in result.stdout and "{" not in result.stdout
    assert "a log line" in result.stderr and "a log line" not in result.stdout
    quiet = CliRunner().invoke(cli.app, ["-q", "mine", "--run", str(tmp_path / "run")])
    assert "a log line" not in quiet.output


def test_long_passages_are_cut_at_a_word_or_clause_boundary():
    english = "waterproof " * 60
    assert cli.shorten(english, 100).endswith("waterproof …") and len(cli.shorten(english, 100)) <= 102
    chinese = "这款背包不防水，" + "适合日常通勤使用，" * 30
    cut = cli.shorten(chinese, 50)
    assert cut.endswith("， …") and cut.startswith("这款背包不防水，") and len(cut) <= 52
    assert cli.shorten("short", 100) == "short"
