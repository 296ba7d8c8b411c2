"""An artefact is built beside the one it replaces: a failed or killed rebuild loses nothing."""

import json

from bsharedrag.run import Artefact


def _build(folder, settings: dict, files: dict[str, str], finish: bool = True) -> Artefact:
    artefact = Artefact(folder, settings, {"upstream": "id-1"})
    building = artefact.start()
    for name, text in files.items():
        (building / name).write_text(text)
    if finish:
        artefact.finish({"files": len(files)})
    return artefact


def test_a_rebuild_keeps_the_previous_artefact_until_the_new_one_is_complete(tmp_path):
    folder = tmp_path / "stage"
    first = _build(folder, {"size": 1}, {"old.txt": "old"})
    assert first.is_fresh() and (folder / "old.txt").read_text() == "old"

    unfinished = _build(folder, {"size": 2}, {"new.txt": "half"}, finish=False)  # a crash mid-build
    assert (folder / "old.txt").exists() and first.is_fresh() and not unfinished.is_fresh()

    resumed = Artefact(folder, {"size": 2}, {"upstream": "id-1"})
    building = resumed.start()
    assert (building / "new.txt").read_text() == "half"  # the same fingerprint resumes its attempt
    (building / "new.txt").write_text("new")
    resumed.finish({})
    assert resumed.is_fresh() and not first.is_fresh()
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # nothing left beside it


def test_another_fingerprint_wipes_an_unfinished_attempt_but_not_the_artefact(tmp_path):
    folder = tmp_path / "stage"
    _build(folder, {"size": 1}, {"old.txt": "old"})
    _build(folder, {"size": 2}, {"stray.txt": "x"}, finish=False)
    building = Artefact(folder, {"size": 3}, {"upstream": "id-1"}).start()
    assert list(building.iterdir()) == [building / "pending.json"]
    assert (folder / "old.txt").exists()


def test_a_swap_killed_between_its_renames_is_completed(tmp_path):
    folder = tmp_path / "stage"
    _build(folder, {"size": 1}, {"old.txt": "old"})
    new = _build(folder, {"size": 2}, {"new.txt": "new"}, finish=False)
    building = folder.with_name(".stage.building")
    (building / "manifest.json").write_text(json.dumps({"fingerprint": new.fingerprint}))
    folder.rename(folder.with_name(".stage.previous"))  # killed here: the new artefact was complete
    assert Artefact(folder, {"size": 2}, {"upstream": "id-1"}).is_fresh()
    assert (folder / "new.txt").exists() and not folder.with_name(".stage.previous").exists()


def test_saving_unchanged_settings_leaves_config_yaml_untouched(tmp_path):
    from bsharedrag.config import load_config
    from bsharedrag.run import Run

    run = Run(load_config(run_dir=str(tmp_path / "run")))
    run.save_config()
    before = run.config_file.stat().st_mtime_ns
    Run.open(tmp_path / "run").save_config()
    assert run.config_file.stat().st_mtime_ns == before
    Run.open(tmp_path / "run", ["seed=7"]).save_config()
    assert Run.open(tmp_path / "run").config.seed == 7
