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
    runs, _, _ = evaluate.retrieval_runs(None, dataset, ["bm25"])
    (bar,) = bars
    assert bar.desc == "retrieve (bm25)" and bar.done == bar.total == len(dataset.queries) > 1
    assert set(runs["bm25"]) == {query.id for query in dataset.queries}
