import json
from pathlib import Path

import pytest
import torch
from tiny import FakeRetriever, make_doc, tiny_backbone

from bsharedrag.config import GeneratorConfig, LoraSettings
from bsharedrag.data import Dataset, Query
from bsharedrag.train.generator import (
    IGNORE_INDEX,
    MAX_ANSWERS_PER_QUERY,
    Triple,
    answer_labels,
    answer_loss_sum,
    build_triples,
    collate,
    encode_triple,
    train_generator,
)
from bsharedrag.model.prompt import turn_end_id

DOCS = [make_doc(n) for n in range(1, 7)]


def _dataset(queries: list[Query], qrels: dict[str, dict[str, int]]) -> Dataset:
    return Dataset(Path("memory"), "train", DOCS, queries, qrels)


def _settings(**overrides) -> GeneratorConfig:
    base = dict(top_k=3, batch_size=4, lr=3e-2, warmup_ratio=0.0, lora=LoraSettings(r=4, alpha=8), log_every=1,
                abstain_rate=0.0)  # triples as retrieved; abstention has tests of its own
    return GeneratorConfig(**{**base, **overrides})


def test_labels_mask_everything_but_the_answer_tokens():
    examples = [answer_labels([5, 6, 7], [8, 9, 2]), answer_labels([5, 6], [10, 2])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 6, 10, 2, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 3 + [8, 9, 2],
        [IGNORE_INDEX] * 2 + [10, 2] + [IGNORE_INDEX] * 2,
    ]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_answer_loss_equals_the_models_own_masked_loss():
    backbone = tiny_backbone()
    triple = Triple("Does it fit?", (DOCS[0], DOCS[1]), "Yes, it fits.", (2,))
    prompt_ids, answer_ids = encode_triple(backbone.tokenizer, triple, _settings())
    batch = collate([answer_labels(prompt_ids, answer_ids)], pad_id=0)
    with torch.no_grad():
        ours = answer_loss_sum(backbone, batch) / len(answer_ids)
        reference = backbone.model(**batch).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_encoded_target_cites_the_relevant_passage_and_ends_the_turn():
    backbone = tiny_backbone()
    triple = Triple("Does it fit?", (DOCS[0], DOCS[1]), "Yes, it fits.", (2,))
    _, answer_ids = encode_triple(backbone.tokenizer, triple, _settings())
    assert backbone.tokenizer.decode(answer_ids[:-1]) == "Yes, it fits. [2]"
    assert answer_ids[-1] == turn_end_id(backbone.tokenizer)


def test_triples_inject_gold_and_cite_it():
    queries = [
        Query("q1", "title: fits?", "fits?", "p1", ("yes", "no", "maybe", "sure", "never")),
        Query("q2", "is it red?", "is it red?", None, ("red",)),
        Query("q3", "no answers", "no answers", None, ()),
    ]
    qrels = {"q1": {"d6": 1, "d5": 2}, "q2": {"d2": 1}, "q3": {"d1": 1}}
    retriever = FakeRetriever(DOCS[:3])
    triples = build_triples([_dataset(queries, qrels)], retriever, _settings(gold_rate=1.0), seed=0)

    assert retriever.calls == [(["title: fits?", "is it red?"], 3, None)]  # query.text, whole corpus
    q1 = [t for t in triples if t.query_id == "q1"]
    assert len(q1) == MAX_ANSWERS_PER_QUERY
    for triple in q1:  # missed by retrieval: the best-graded gold (d5) replaces the last passage
        ids = [doc.id for doc in triple.passages]
        assert len(ids) == 3 and "d5" in ids and "d3" not in ids
        assert triple.cited == (ids.index("d5") + 1,)
    (q2,) = [t for t in triples if t.query_id == "q2"]
    assert [doc.id for doc in q2.passages] == ["d1", "d2", "d3"] and q2.cited == (2,)
    assert not [t for t in triples if t.query_id == "q3"]


def test_triples_without_gold_injection_have_no_citation():
    queries = [Query("q1", "fits?", "fits?", None, ("yes",))]
    triples = build_triples([_dataset(queries, {"q1": {"d6": 1}})], FakeRetriever(DOCS[:3]), _settings(gold_rate=0.0))
    assert [doc.id for doc in triples[0].passages] == ["d1", "d2", "d3"] and triples[0].cited == ()


def test_abstention_prompts_hold_only_passages_known_not_to_answer():
    from bsharedrag.data import Document

    docs = [Document(f"d{n}", "t", f"fact {n}", "p1" if n <= 3 else "p2") for n in range(1, 7)]
    dataset = Dataset(Path("memory"), "train", docs, [Query("q1", "waterproof?", "waterproof?", "p1", ("no",)),
                                                      Query("q2", "防水吗？", "防水吗？", "p1", ("不防水",))],
                      {"q1": {"d1": 1}, "q2": {"d1": 1}})
    settings = _settings(abstain_rate=1.0, top_k=2)
    retriever = FakeRetriever(docs)
    triples = build_triples([dataset], retriever, settings)
    assert retriever.calls[0][1] == 8  # retrieved deeper, to find passages that do not answer
    abstaining = [t for t in triples if t.cited == ()]
    assert [t.answer for t in abstaining] == ["The passages do not say.", "资料中没有提到。"]
    assert all([d.id for d in t.passages] == ["d4", "d5"] for t in abstaining)  # other products only

    judged = build_triples([dataset], FakeRetriever(docs), settings, judged_per_product=[True])
    assert all([d.id for d in t.passages] == ["d2", "d3"] for t in judged if t.cited == ())  # the product's own

    missed = Dataset(Path("memory"), "train", docs, dataset.queries[:1], {"q1": {"d6": 1}})
    (answering, abstained) = build_triples([missed], FakeRetriever(docs), _settings(abstain_rate=1.0, top_k=2,
                                           gold_rate=0.0), judged_per_product=[True])
    assert answering.answer == "The passages do not say." and answering.cited == ()  # a miss with no gold: unsupported
    assert build_triples([dataset], FakeRetriever(docs), _settings(top_k=2)) == build_triples(
        [dataset], FakeRetriever(docs), _settings(top_k=2), judged_per_product=[True])  # off by default: unchanged


def test_one_retriever_per_dataset():
    first, second = FakeRetriever(DOCS[:2]), FakeRetriever(DOCS[3:5])
    datasets = [_dataset([Query(f"q{n}", "fits?", "fits?", None, ("yes",))], {f"q{n}": {"d1": 1}}) for n in (1, 2)]
    triples = build_triples(datasets, [first, second], _settings(gold_rate=0.0))
    assert [[doc.id for doc in t.passages] for t in triples] == [["d1", "d2"], ["d4", "d5"]]
    assert triples[0].cited == (1,) and triples[1].cited == ()
    with pytest.raises(ValueError, match="2 datasets"):
        build_triples(datasets, [first], _settings())


def test_closed_book_triples_need_no_retriever():
    queries = [Query("q1", "fits?", "fits?", None, ("yes",))]
    (triple,) = build_triples([_dataset(queries, {"q1": {"d6": 1}})], None, _settings(with_passages=False))
    assert triple.passages == () and triple.cited == ()


def _triples() -> list[Triple]:
    return [
        Triple("Does it fit a 2012 model?", (DOCS[0], DOCS[1]), "Yes, it fits the 2012 model.", (1,)),
        Triple("Is it waterproof?", (DOCS[2], DOCS[3]), "No, it is not waterproof.", (2,)),
        Triple("What colour is it?", (DOCS[4],), "It is dark blue.", (1,)),
        Triple("How long is the cable?", (DOCS[5], DOCS[0]), "The cable is two metres long.", ()),
    ]


def test_training_lowers_the_loss_and_the_saved_adapter_reloads(tmp_path):
    backbone = tiny_backbone()
    stats = train_generator(backbone, _triples(), _settings(max_steps=12, epochs=20), tmp_path / "generator", seed=0)

    assert stats["steps"] == 12 and stats["final_loss"] < 0.8 * stats["first_loss"]
    assert (tmp_path / "generator" / "adapter_config.json").exists()
    assert not (tmp_path / "generator" / "checkpoint").exists()
    assert json.loads((tmp_path / "generator" / "training.json").read_text())["stats"] == stats
    assert backbone.active_adapter is None and not backbone.model.training

    reloaded = tiny_backbone()
    reloaded.load_adapter("generator", tmp_path / "generator")
    ids = torch.tensor([[1, 520, 9531, 198, 6004]])
    with torch.no_grad(), backbone.adapter("generator"), reloaded.adapter("generator"):
        assert torch.allclose(backbone.model(input_ids=ids).logits, reloaded.model(input_ids=ids).logits, atol=1e-6)
    with torch.no_grad(), reloaded.adapter(None):
        bare = reloaded.model(input_ids=ids).logits
    with torch.no_grad(), reloaded.adapter("generator"):
        assert not torch.allclose(bare, reloaded.model(input_ids=ids).logits)


@pytest.mark.parametrize("split", [{"micro_batch_size": 1}, {"micro_batch_size": 2}, {"micro_batch_tokens": 200},
                                   {"micro_batch_tokens": 200, "pad_to_multiple": 64}, {"pad_to_multiple": 7}])
def test_micro_batches_and_padding_give_the_same_update_as_one_batch(tmp_path, split):
    def trained(name: str, **settings):
        backbone = tiny_backbone()
        settings = {"pad_to_multiple": 1, **settings}
        train_generator(backbone, _triples(), _settings(max_steps=1, **settings), tmp_path / name)
        return {n: p.detach().clone() for n, p in backbone.model.named_parameters() if ".generator." in n}

    whole, parts = trained("whole"), trained("parts", **split)
    assert all(torch.allclose(whole[name], parts[name], atol=1e-6) for name in whole)


def test_token_bounded_micro_batches_put_long_examples_alone_and_short_ones_together():
    from bsharedrag.train.loop import micro_batches

    lengths = [500, 90, 300, 120, 640, 310, 80, 100]
    groups = micro_batches(lengths, _settings(batch_size=8, micro_batch_tokens=640), length=lambda n: n)
    assert sorted(n for group in groups for n in group) == sorted(lengths)
    assert all(len(group) * max(group) <= 640 or len(group) == 1 for group in groups)
    assert [500] in groups and [640] in groups and len(groups) < len(lengths)
    assert micro_batches(lengths, _settings(batch_size=8, micro_batch_size=4)) == [lengths[:4], lengths[4:]]


def test_collate_pads_to_a_multiple_and_masks_the_padding():
    batch = collate([answer_labels([5, 6, 7], [8, 2]), answer_labels([5], [9, 2])], pad_id=0, multiple=4)
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3,
                                                                                         [1] * 3 + [0] * 5]
    assert batch["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3
