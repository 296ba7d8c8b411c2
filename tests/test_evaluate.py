from bsharedrag import evaluate
from bsharedrag.data import load_dataset


def test_retrieval_over_many_questions_shows_its_progress(tiny_dataset, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.total, self.desc, self.done = total, desc, 0
            bars.append(self)

        def update(self, count):
            self.done += count

        def close(self):
            pass

    monkeypatch.setattr(evaluate, "progress", Bar)
    monkeypatch.setattr(evaluate, "_SEARCH_CHUNK", 1)
    dataset = load_dataset(tiny_dataset, "train")
    runs, *_ = evaluate.retrieval_runs(None, dataset, ["bm25"])
    (bar,) = bars
    assert bar.desc == "retrieve (bm25)" and bar.done == bar.total == len(dataset.queries) > 1
    assert set(runs["bm25"]) == {query.id for query in dataset.queries}


def test_polarity_reads_the_leading_yes_or_no():
    assert [evaluate.polarity(a) for a in ["Yes, it is [1].", "no.", "Not at all", "Nobody knows", "It is"]] == [
        "yes", "no", "no", None, None]
    assert evaluate._reference_polarity(("Yes.", "yes it does", "No")) == "yes"
    assert evaluate._reference_polarity(("Yes.", "No")) is None


def test_abstention_is_recognised_in_its_trained_and_common_forms():
    from bsharedrag.model.prompt import abstention_answer, is_abstention

    for question in ("Is it waterproof?", "防水吗？"):
        assert is_abstention(abstention_answer(question))
    assert is_abstention("The passages don't mention the size.") and is_abstention("无法回答这个问题")
    assert not is_abstention("No, it is not waterproof [1].")
