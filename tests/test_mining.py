import numpy as np

from bsharedrag.config import MineConfig
from bsharedrag.data import load_dataset
from bsharedrag.train.mining import mine_negatives


def _scores_favouring(dataset, favoured: str):
    ids = [d.id for d in dataset.corpus]

    def scorer(questions):
        rows = np.tile(np.linspace(1.0, 0.0, len(ids)), (len(questions), 1))
        rows[:, ids.index(favoured)] = 5.0
        return rows

    return scorer


def test_mining_never_returns_a_positive(tiny_dataset):
    from bsharedrag.model.baselines import BM25Retriever

    dataset = load_dataset(tiny_dataset, "train")
    settings = MineConfig(num_negatives=5, rank_window=(0, 20), false_negative_margin=1.0)
    mined = mine_negatives(dataset, BM25Retriever(dataset.corpus).scores, settings, seed=0)
    assert set(mined) == {q.id for q in dataset.queries}
    for query_id, negatives in mined.items():
        assert negatives
        assert not set(negatives) & set(dataset.qrels[query_id])


def test_false_negative_guard_drops_candidates_scoring_like_positives(tiny_dataset):
    dataset = load_dataset(tiny_dataset, "train")
    suspicious = "p5-d2"  # scored far above every labelled positive: probably an unlabelled positive
    settings = MineConfig(num_negatives=30, rank_window=(0, 30), false_negative_margin=0.95)
    mined = mine_negatives(dataset, _scores_favouring(dataset, suspicious), settings, seed=0)
    for query_id, negatives in mined.items():
        assert suspicious not in negatives or suspicious in dataset.qrels[query_id]


def test_random_negatives_exclude_positives(tiny_dataset):
    dataset = load_dataset(tiny_dataset, "train")
    mined = mine_negatives(dataset, None, MineConfig(random_negatives=True, num_negatives=4), seed=1)
    for query_id, negatives in mined.items():
        assert len(negatives) == 4 and not set(negatives) & set(dataset.qrels[query_id])


def test_judged_per_product_takes_the_products_unlabelled_passages_hardest_first(tiny_dataset):
    dataset = load_dataset(tiny_dataset, "train")
    favoured = "p5-d2"  # the guard drops it (scored far above the positive); judged, it is a known negative
    settings = MineConfig(num_negatives=3, same_product=2, rank_window=(0, 30), false_negative_margin=0.95)
    mined = mine_negatives(dataset, _scores_favouring(dataset, favoured), settings, seed=0, judged_per_product=True)
    for query in dataset.queries:
        negatives = mined[query.id]
        assert len(negatives) == 3 and not set(negatives) & set(dataset.qrels[query.id])
        own = [f"{query.product_id}-d1", f"{query.product_id}-d2"]
        expected = own[::-1] if favoured in own else own  # the scorer ranks d1 above d2 unless d2 is favoured
        assert negatives[:2] == expected
        assert not any(doc.startswith(f"{query.product_id}-") for doc in negatives[2:])


def test_same_product_is_ignored_unless_the_dataset_is_judged_per_product(tiny_dataset):
    dataset = load_dataset(tiny_dataset, "train")
    scorer = _scores_favouring(dataset, "p5-d2")
    settings = MineConfig(num_negatives=3, same_product=2, rank_window=(0, 30))
    assert mine_negatives(dataset, scorer, settings, seed=0) == mine_negatives(
        dataset, scorer, settings.model_copy(update={"same_product": 0}), seed=0, judged_per_product=True
    )
