import pytest

from bsharedrag.files import replacing, settled, swap_in


def test_replacing_a_folder_leaves_the_old_one_when_the_write_fails(tmp_path):
    target = tmp_path / "checkpoint"
    with replacing(target) as partial:
        partial.mkdir()
        (partial / "state").write_text("1")
    with pytest.raises(RuntimeError), replacing(target) as partial:
        partial.mkdir()
        (partial / "state").write_text("half")
        raise RuntimeError("killed")
    assert (target / "state").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_folder_swap_killed_between_its_renames_is_completed(tmp_path):
    target, partial = tmp_path / "cache", tmp_path / "cache.partial"
    target.mkdir()
    (target / "v").write_text("old")
    partial.mkdir()
    (partial / "v").write_text("new")
    target.rename(tmp_path / ".cache.previous")  # what swap_in does first; killed before its second rename
    assert (settled(target) / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_swap_in_replaces_a_link_without_touching_what_it_points_at(tmp_path):
    elsewhere = tmp_path / "other-run"
    elsewhere.mkdir()
    (elsewhere / "v").write_text("theirs")
    link, new = tmp_path / "stage", tmp_path / "new"
    link.symlink_to(elsewhere)
    new.mkdir()
    (new / "v").write_text("ours")
    swap_in(new, link)
    assert not link.is_symlink() and (link / "v").read_text() == "ours"
    assert (elsewhere / "v").read_text() == "theirs"
