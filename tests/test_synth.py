import json

import pytest
from tiny import tiny_backbone

from bsharedrag.config import SynthConfig
from bsharedrag.data import Document, load_dataset
from bsharedrag.synth import filter_pairs, parse_pairs, synthesise, writer_prompt

DOCS = [
    Document("kettle", "Acme Kettle", "The kettle holds 1.7 litres and boils water in three minutes.", "K1"),
    Document("lid", "Acme Kettle", "The lid is stainless steel and opens with a button.", "K1"),
    Document("bag", "Trail backpack", "The backpack is not waterproof; a rain cover is sold separately.", "B1"),
    Document("cup", "保温杯", "不锈钢内胆，保温十二小时，容量五百毫升。", "C1"),
]
REPLIES = {
    "kettle": "Q: How long does it take to boil?\nA: About three minutes.\nQ: What volume of water fits?\nA: 1.7 litres.",
    "lid": "1. Q: Is the top made of metal?\nA: Yes, stainless steel.",
    "bag": "Q: Can I use it in heavy rain?\nA: It is not waterproof; buy the rain cover.",
    "cup": "问：能保温多久？\n答：保温十二小时。",
}


def _corpus(tmp_path, docs=DOCS):
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in docs))
    return folder


def _scripted(replies=REPLIES, calls=None):
    def write(prompts):
        if calls is not None:
            calls.append(len(prompts))
        return [next(replies[d.id] for d in DOCS if d.text in user) for _, user in prompts]

    return write


def test_the_prompt_follows_the_passage_language_and_replies_parse_in_both():
    assert "Write 2 questions" in writer_prompt(DOCS[0], 2)[1]
    assert "写出2个" in writer_prompt(DOCS[3], 2)[1]
    assert parse_pairs(REPLIES["kettle"]) == [("How long does it take to boil?", "About three minutes."),
                                              ("What volume of water fits?", "1.7 litres.")]
    assert parse_pairs(REPLIES["cup"]) == [("能保温多久？", "保温十二小时。")]
    assert parse_pairs("Q: a question with no answer") == [] and parse_pairs("just text") == []


def test_each_filter_removes_its_case_and_counts_it():
    replies = {
        "kettle": "Q: The kettle holds 1.7 litres and boils water?\nA: Yes.",  # copies six passage words
        "lid": "Q: What colour is the lid?\nA: Bright purple with golden stripes.",  # the passage does not say
        "bag": "Q: Is the backpack waterproof?\nA: It is not waterproof.\nQ: Is this backpack waterproof?\nA: No, not waterproof.",
        "cup": "问：保温杯的容量是多少？\n答：五百毫升。\nQ: What is the best price online?\nA: 保温十二小时。",
    }
    settings = SynthConfig(round_trip_k=1)
    kept, counts = filter_pairs(replies, {d.id: d for d in DOCS}, settings)
    assert counts["copies"] == 1 and counts["unsupported"] == 1 and counts["duplicates"] == 1
    assert counts["round_trip"] == 1  # "best price online" shares no word with the cup's passage
    assert [(doc, question) for doc, question, _ in kept] == [("bag", "Is the backpack waterproof?"),
                                                              ("cup", "保温杯的容量是多少？")]
    assert counts["kept"] == 2 and counts["pairs"] == 6 and counts["unparsed"] == 0


def test_synth_writes_a_beir_dataset_with_a_held_back_split_and_is_reproducible(tmp_path):
    corpus = _corpus(tmp_path)
    settings = SynthConfig(passages=None, validation_fraction=0.25, round_trip_k=4)
    manifest = synthesise(corpus, tmp_path / "synthetic", settings, seed=1, writer=_scripted())
    train, dev = load_dataset(tmp_path / "synthetic", "train"), load_dataset(tmp_path / "synthetic", "dev")
    assert len(train.queries) + len(dev.queries) == manifest["filters"]["kept"] == 3
    assert manifest["filters"]["round_trip"] == 2  # paraphrases BM25 cannot match ("boil" for "boils")
    assert dev.queries and not {d for r in train.qrels.values() for d in r} & {d for r in dev.qrels.values() for d in r}
    kettle = next(q for q in train.queries + dev.queries if q.question == "What volume of water fits?")
    assert kettle.text == "Acme Kettle: What volume of water fits?" and kettle.answers == ("1.7 litres.",)
    assert kettle.product_id == "K1"
    assert not (tmp_path / ".synthetic.writing").exists()
    again = synthesise(corpus, tmp_path / "again", settings, seed=1, writer=_scripted())
    for name in ("queries.jsonl", "qrels/train.tsv", "qrels/dev.tsv"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "synthetic" / name).read_text()
    assert again["filters"] == manifest["filters"]


def test_a_killed_synth_resumes_without_writing_a_passage_twice(tmp_path):
    corpus = _corpus(tmp_path)
    settings = SynthConfig(passages=None, batch_size=2, round_trip_k=4)

    def dies_after_one_batch(prompts, seen=[]):  # noqa: B006 - counts calls across the run
        if seen:
            raise KeyboardInterrupt
        seen.append(1)
        return _scripted()(prompts)

    with pytest.raises(KeyboardInterrupt):
        synthesise(corpus, tmp_path / "synthetic", settings, writer=dies_after_one_batch)
    assert not (tmp_path / "synthetic").exists()
    calls = []
    resumed = synthesise(corpus, tmp_path / "synthetic", settings, writer=_scripted(calls=calls))
    assert calls == [2]  # only the second batch was written again
    whole = synthesise(corpus, tmp_path / "whole", settings, writer=_scripted())
    assert resumed["filters"] == whole["filters"]
    assert (tmp_path / "synthetic" / "queries.jsonl").read_text() == (tmp_path / "whole" / "queries.jsonl").read_text()


def test_the_local_writer_generates_with_a_transformers_model(tmp_path):
    backbone = tiny_backbone()
    backbone.base.save_pretrained(tmp_path / "writer")
    backbone.tokenizer.save_pretrained(tmp_path / "writer")
    settings = SynthConfig(passages=2, max_new_tokens=12, batch_size=2)
    with pytest.raises(ValueError, match="no question survived the filters \\(replies 2, "):  # random: no pair parses
        synthesise(_corpus(tmp_path), tmp_path / "synthetic", settings, model_source=tmp_path / "writer")
    replies = (tmp_path / ".synthetic.writing" / "replies.jsonl").read_text().splitlines()
    assert len(replies) == 2  # what it wrote is kept, to read or to resume from


def test_the_synth_command_writes_with_the_configured_model(tmp_path):
    from typer.testing import CliRunner

    from bsharedrag import cli

    backbone = tiny_backbone()
    backbone.base.save_pretrained(tmp_path / "writer")
    backbone.tokenizer.save_pretrained(tmp_path / "writer")
    result = CliRunner().invoke(cli.app, ["synth", "--corpus", str(_corpus(tmp_path)), "--out", str(tmp_path / "out"),
                                          "--set", f"synth.writer={tmp_path / 'writer'}", "--set", "synth.passages=1",
                                          "--set", "synth.max_new_tokens=10"])
    assert result.exit_code == 1 and "no question survived" in result.output  # a random writer: nothing parses
