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


def test_what_reading_lost_is_recorded(tmp_path):
    folder = write_dataset(tmp_path / "broken", broken_line=True)
    with (folder / "qrels" / "train.tsv").open("a") as handle:
        handle.write("p1-q\tbroken\t1\nlonely-q\tbroken\t2\n")  # judgements of the passage on the broken line
    dataset = load_dataset(folder, "train")
    assert dataset.losses["dropped_judgements"] == 2 and dataset.losses["dropped_queries"] == 1
    (skipped,) = dataset.losses["skipped_lines"]
    assert skipped.startswith(f"{folder / 'corpus.jsonl'}:3: ")
    assert dataset.sample(1).losses == dataset.losses


def test_the_strict_error_says_error_not_skipped(tmp_path):
    folder = write_dataset(tmp_path / "broken", broken_line=True)
    with pytest.raises(DataError) as error:
        load_dataset(folder, "train", strict=True)
    assert "malformed line" in str(error.value) and "skipped" not in str(error.value).split("(")[0]
    assert "strict_data" in str(error.value)


def test_a_query_with_empty_text_is_a_malformed_line(tmp_path):
    folder = write_dataset(tmp_path / "blank")
    with (folder / "queries.jsonl").open("a") as handle:
        handle.write('{"_id": "blank-q", "text": "   "}\n')
    lines = len((folder / "queries.jsonl").read_text().splitlines())
    with pytest.raises(DataError, match=rf"queries.jsonl:{lines}: malformed line \(query blank-q: `text` is empty\)"):
        load_dataset(folder, "train", strict=True)
