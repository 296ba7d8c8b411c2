"""The CLI's stage commands: `--force` rebuilds the named stage only, `--force-upstream` its upstream too."""

import pytest
from typer.testing import CliRunner

from bsharedrag import cli


@pytest.mark.parametrize(("flags", "rebuilt"), [
    ([], ()),
    (["--force"], ("index",)),
    (["--force-upstream"], ("pretrain", "mine", "retriever", "index")),
])
def test_a_stage_command_rebuilds_what_its_flags_name(flags, rebuilt, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_stages", lambda run, stages, rebuild: calls.append((stages, tuple(rebuild))) or {})
    result = CliRunner().invoke(cli.app, ["index", "--run", str(tmp_path / "run"), *flags])
    assert result.exit_code == 0, result.output
    assert calls == [(("pretrain", "mine", "retriever", "index"), rebuilt)]


@pytest.mark.parametrize("command", [["search", "kettle?"], ["ask", "kettle?"], ["eval"], ["docs", "rm", "d1"]])
def test_a_command_on_a_missing_run_folder_says_so(command, tmp_path):
    result = CliRunner().invoke(cli.app, [*command, "--run", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert f"no run folder {tmp_path / 'nowhere'}" in result.output and "Traceback" not in result.output
