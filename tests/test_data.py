import logging

import pytest

from bsharedrag.data import DataError, load_dataset, read_corpus
from conftest import write_dataset


def test_reads_beir_folder_in_english_and_chinese(tiny_dataset):
    dataset = load_dataset(tiny_dataset, "train")
    assert len(dataset.corpus) == 24
    assert {q.id for q in dataset.queries} == set(dataset.qrels)
    chinese = {q.id: q.text for q in dataset.queries if q.id in ("p6-q", "p7-q")}
    assert "烧开水" in chinese["p6-q"] and "耳机" in chinese["p7-q"]
    assert dataset.queries[0].answers


def test_broken_corpus_line_is_reported_with_file_and_line_not_fatal(tmp_path, caplog):
    folder = write_dataset(tmp_path / "broken", broken_line=True)
    with caplog.at_level(logging.WARNING):
        docs = read_corpus(folder / "corpus.jsonl")
    assert len(docs) == 24
    assert f"{folder / 'corpus.jsonl'}:3" in caplog.text


def test_strict_mode_turns_a_broken_line_into_an_error(tmp_path):
    folder = write_dataset(tmp_path / "broken", broken_line=True)
    with pytest.raises(DataError, match=r"corpus.jsonl:3"):
        load_dataset(folder, "train", strict=True)


def test_missing_split_names_the_available_ones(tiny_dataset):
    with pytest.raises(FileNotFoundError, match="dev"):
        load_dataset(tiny_dataset, "test")
