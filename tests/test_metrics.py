import math

import pytest

from bsharedrag.metrics import (
    bleu3,
    citation_precision,
    generation_metrics,
    hit_at_k,
    markdown_table,
    minilm_path,
    mrr_at_k,
    ndcg_at_k,
    per_query_metrics,
    recall_at_k,
    retrieval_metrics,
    rouge_l,
)
from bsharedrag.text import words

# q1 ranks a non-relevant doc, then b (grade 1), then a (grade 2); q2 finds c first; q3 is not in the run.
QRELS = {"q1": {"a": 2, "b": 1}, "q2": {"c": 1}, "q3": {"d": 1}}
RUN = {"q1": ["x", "b", "a", "y"], "q2": ["c", "z"]}
LOG3 = math.log2(3)
# q1 nDCG@3: DCG = 0/log2(2) + 1/log2(3) + 2/log2(4) = 1/log2(3) + 1 = 1.63093
#            IDCG = 2/log2(2) + 1/log2(3) = 2 + 1/log2(3) = 2.63093  ->  0.61990
Q1_NDCG3 = (1 / LOG3 + 1) / (2 + 1 / LOG3)


@pytest.mark.parametrize(
    "function, k, expected",
    [
        (hit_at_k, 1, 0.0),
        (hit_at_k, 2, 1.0),
        (mrr_at_k, 1, 0.0),
        (mrr_at_k, 10, 0.5),
        (recall_at_k, 2, 0.5),
        (recall_at_k, 3, 1.0),
        (ndcg_at_k, 1, 0.0),
        # nDCG@2: DCG = 1/log2(3); IDCG = 2 + 1/log2(3)
        (ndcg_at_k, 2, (1 / LOG3) / (2 + 1 / LOG3)),
        (ndcg_at_k, 3, Q1_NDCG3),
        (ndcg_at_k, 10, Q1_NDCG3),
    ],
)
def test_single_query_metrics(function, k, expected):
    assert function(QRELS["q1"], RUN["q1"], k) == pytest.approx(expected)


def test_ndcg_value_by_hand():
    assert Q1_NDCG3 == pytest.approx(0.61990, abs=1e-5)


def test_perfect_graded_ranking_has_ndcg_one():
    assert ndcg_at_k({"a": 2, "b": 1}, ["a", "b"], 10) == pytest.approx(1.0)
    # the lower grade first loses: (1 + 2/log2(3)) / (2 + 1/log2(3))
    assert ndcg_at_k({"a": 2, "b": 1}, ["b", "a"], 10) == pytest.approx((1 + 2 / LOG3) / (2 + 1 / LOG3))


def test_duplicates_in_a_run_count_once():
    assert recall_at_k({"a": 1, "b": 1}, ["a", "a", "b"], 2) == 1.0
    assert ndcg_at_k({"a": 1}, ["a", "a"], 2) == pytest.approx(1.0)


def test_mean_over_queries_with_missing_query_as_zero():
    result = retrieval_metrics(QRELS, RUN, ("hit@1", "hit@3", "mrr@10", "recall@10", "ndcg@3"))
    assert result["hit@1"] == pytest.approx(1 / 3)  # only q2
    assert result["hit@3"] == pytest.approx(2 / 3)  # q1 and q2, q3 missing
    assert result["mrr@10"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert result["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert result["ndcg@3"] == pytest.approx((Q1_NDCG3 + 1 + 0) / 3)
    assert per_query_metrics(QRELS, RUN, ("hit@3",))["q3"] == {"hit@3": 0.0}


def test_default_metric_names_and_errors():
    assert list(retrieval_metrics(QRELS, RUN)) == [
        "hit@1", "hit@3", "hit@5", "ndcg@3", "ndcg@5", "ndcg@10", "mrr@10", "recall@10",
    ]
    with pytest.raises(ValueError, match="'map@10'"):
        retrieval_metrics(QRELS, RUN, ("map@10",))
    with pytest.raises(ValueError, match="got 0"):
        hit_at_k({"a": 1}, ["a"], 0)
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics({}, RUN)


def test_bleu3():
    assert bleu3("The cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu3("dogs bark loudly", ["the cat sat on the mat"]) == pytest.approx(0.0)
    # p1 = 5/6, p2 = 3/5, p3 = 2/4, equal lengths (no brevity penalty): (5/6 * 3/5 * 1/2) ** (1/3)
    assert bleu3("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(100 * 0.25 ** (1 / 3))
    assert bleu3("the cat sat on the mat", ["dogs bark", "the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu3("", ["anything"]) == 0.0


def test_rouge_l():
    assert rouge_l("The cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l("dogs bark loudly", ["the cat sat on the mat"]) == 0.0
    # LCS "the cat sat on mat" = 5 words of 6 on both sides: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(100 * 5 / 6)
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)  # Porter stemming


@pytest.mark.parametrize(
    "hypothesis, reference",
    [("the dogs were running in the park", "a dog runs in parks"), ("Yes, it fits the model.", "It fits.")],
)
def test_rouge_l_matches_rouge_score_on_english(hypothesis, reference):
    from rouge_score.rouge_scorer import RougeScorer

    expected = RougeScorer(["rougeL"], use_stemmer=True).score(reference, hypothesis)["rougeL"].fmeasure
    assert rouge_l(hypothesis, [reference]) == pytest.approx(100 * expected)


def test_chinese_is_segmented():
    hypothesis, reference = "这个冰箱抽屉很好用", "这个抽屉非常好用"
    assert len(words(hypothesis)) > 1
    assert 0 < rouge_l(hypothesis, [reference]) < 100
    assert 0 < bleu3("这个冰箱的抽屉很好用吗", ["这个冰箱的抽屉非常好用"]) < 100


def test_citation_precision():
    assert citation_precision([], {"a": 1}) is None
    assert citation_precision(["a", "b"], {"a": 2, "b": 0}) == 0.5
    assert citation_precision(["a", "a", "c"], ["a"]) == 0.5  # distinct citations
    assert citation_precision(["z"], {"a": 1}) == 0.0


def test_generation_metrics_without_bertscore():
    result = generation_metrics(
        predictions={"q1": "the cat sat on the mat"},  # q2 has no prediction: scored as empty
        references={"q1": ["the cat sat on the mat"], "q2": ["dogs bark"], "q3": []},  # q3 is not scored
        citations={"q1": ["a"]},  # q2 cites nothing: 0 precision
        qrels={"q1": {"a": 1}},
        with_bertscore=False,
    )
    assert result == pytest.approx({"bleu3": 50.0, "rougeL": 50.0, "citation_precision": 0.5})
    with pytest.raises(ValueError, match="no query has a reference"):
        generation_metrics({}, {"q1": [" "]}, {}, {}, with_bertscore=False)


def test_markdown_table():
    table = markdown_table({"bm25": {"hit@3": 0.75, "bleu3": 12.345}, "dense": {"hit@3": 0.9}})
    assert table.splitlines() == [
        "| system | hit@3 | bleu3 |",
        "| --- | ---: | ---: |",
        "| bm25 | 0.750 | 12.35 |",
        "| dense | 0.900 | – |",
    ]


def test_minilm_path():
    assert (minilm_path() / "config.json").is_file()


def test_bootstrap_intervals_are_zero_wide_for_a_constant_and_fixed_by_the_seed():
    from bsharedrag.metrics import bootstrap_intervals

    per_query = {f"q{i}": {"hit@1": 1.0, "ndcg@10": (i % 4) / 4} for i in range(40)}
    intervals = bootstrap_intervals(per_query, resamples=500, seed=3)
    assert intervals["hit@1"] == (1.0, 1.0)
    low, high = intervals["ndcg@10"]
    assert low < 0.375 < high and high - low < 0.3  # the mean is 0.375
    assert bootstrap_intervals(per_query, resamples=500, seed=3) == intervals
    assert bootstrap_intervals(per_query, resamples=500, seed=4) != intervals


def test_a_paired_difference_separates_a_real_gap_and_not_noise():
    from bsharedrag.metrics import paired_difference

    ours = {f"q{i}": 1.0 if i % 10 else 0.0 for i in range(100)}  # 0.9
    worse = {f"q{i}": 1.0 if i % 2 else 0.0 for i in range(100)}  # 0.5
    gap = paired_difference(ours, worse, resamples=1000, seed=0)
    assert abs(gap["difference"] - 0.4) < 1e-9 and gap["excludes_zero"] and gap["low"] > 0.25
    swapped = {f"q{i}": ours[f"q{(i + 1) % 100}"] for i in range(100)}  # the same scores, other queries
    noise = paired_difference(ours, swapped, resamples=1000, seed=0)
    assert noise["difference"] == 0.0 and not noise["excludes_zero"]
    assert paired_difference(ours, {"q1": 0.0, "other": 1.0})["queries"] == 1


def test_generation_metrics_are_the_means_of_the_per_query_scores():
    from bsharedrag.metrics import generation_metrics, generation_scores

    args = ({"a": "it fits", "b": "no"}, {"a": ["it fits well"], "b": ["yes it does"]}, {"a": ["d1"]}, {"a": {"d1": 1}})
    per_query = generation_scores(*args, with_bertscore=False)
    assert set(per_query) == {"a", "b"} and per_query["a"]["citation_precision"] == 1.0
    means = generation_metrics(*args, with_bertscore=False)
    assert means["citation_precision"] == 0.5 and means["bleu3"] == (per_query["a"]["bleu3"] + per_query["b"]["bleu3"]) / 2


def test_tables_show_intervals_in_brackets():
    from bsharedrag.metrics import markdown_table

    table = markdown_table({"bm25": {"hit@3": 0.75, "bleu3": 20.0}},
                           intervals={"bm25": {"hit@3": (0.7, 0.8), "bleu3": (18.0, 22.5)}})
    assert "| bm25 | 0.750 [0.700, 0.800] | 20.00 [18.00, 22.50] |" in table
