import numpy as np
import pytest

from bsharedrag.model.baselines import BM25Retriever, EncoderRetriever, Retriever, build_run
from bsharedrag.data import Document, Query
from bsharedrag.metrics import bertscore

ENGLISH = [
    Document("d0", "Frigidaire Crisper Pan", "This drawer fits refrigerators that call for part 240337103."),
    Document("d1", "Supco Ice Maker", "The ice maker kit installs in most freezers; any ice bucket works."),
    Document("d2", "Whirlpool Dishwasher Latch", "The door latch only comes in black."),
    Document("d3", "Garden Hose", "A fifty foot hose with a brass nozzle."),
]
CHINESE = [
    Document("z0", "冰箱抽屉", "这个抽屉适合大多数冰箱，尺寸是四十厘米。"),
    Document("z1", "洗碗机门锁", "洗碗机的门锁只有黑色，没有白色。"),
    Document("z2", "制冰机", "制冰机安装简单，需要连接水管。"),
]


@pytest.mark.parametrize(
    "corpus, question, expected",
    [
        (ENGLISH, "does the ice bucket work with this ice maker?", "d1"),
        (ENGLISH, "is the dishwasher latch available in white?", "d2"),
        (CHINESE, "洗碗机门锁有白色的吗？", "z1"),
        (CHINESE, "制冰机怎么安装？", "z2"),
    ],
)
def test_bm25_ranks_the_matching_document_first(corpus, question, expected):
    hits = BM25Retriever(corpus).search([question], top_k=2)[0]
    assert hits[0].doc.id == expected
    assert hits[0].score > hits[1].score


def test_bm25_top_k_guards():
    retriever = BM25Retriever(ENGLISH)
    assert isinstance(retriever, Retriever)
    assert [len(hits) for hits in retriever.search(["hose", "the of"], top_k=50)] == [4, 4]
    assert retriever.search(["the of"], top_k=2)[0][0].score == 0.0  # stopwords only: nothing matches
    assert retriever.search([], top_k=3) == []
    with pytest.raises(ValueError, match="got 0"):
        retriever.search(["hose"], top_k=0)
    with pytest.raises(ValueError, match="empty"):
        BM25Retriever([])
    with pytest.raises(ValueError, match="'fr'"):
        BM25Retriever(ENGLISH, stopwords=("fr",))


@pytest.fixture(scope="module")
def encoder():
    return EncoderRetriever(ENGLISH, batch_size=2)


def test_encoder_ranks_the_paraphrase_first(encoder):
    assert isinstance(encoder, Retriever)
    hits = encoder.search(["Can I get the door catch of my dish washer in white?", "watering the lawn"], top_k=10)
    assert [len(row) for row in hits] == [4, 4]
    assert hits[0][0].doc.id == "d2"
    assert hits[1][0].doc.id == "d3"
    scores = [hit.score for hit in hits[0]]
    assert scores == sorted(scores, reverse=True)
    run = build_run(encoder, [Query("q", "dish washer door catch", "door catch")], top_k=1)
    assert run == {"q": ["d2"]}


def test_bf16_autocast_matches_float32(encoder):
    other = EncoderRetriever(ENGLISH, autocast="bf16" if not encoder.encoder.bf16 else "off")
    cosine = np.sum(other.embeddings * encoder.embeddings, axis=1)
    assert cosine.min() > 0.999


def test_bertscore_prefers_identical_text():
    same, unrelated = bertscore(
        ["the latch only comes in black", "the latch only comes in black"],
        [["the latch only comes in black"], ["a fifty foot garden hose with a nozzle"]],
    )
    assert same == pytest.approx(100.0, abs=0.1)
    assert 0 <= unrelated < same
    with pytest.raises(ValueError, match="no reference"):
        bertscore(["a"], [[]])


def test_bertscore_of_an_empty_answer_is_zero_not_a_crash():
    scores = bertscore(["", "The bag is waterproof.", "Yes."], [["It is waterproof."], ["The bag is waterproof."], ["", "Yes."]])
    assert scores[0] == 0.0 and scores[1] > 90 and scores[2] > 90
