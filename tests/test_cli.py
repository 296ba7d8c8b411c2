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
