"""Shared fixtures: a tiny random model saved as a local folder and a tiny bilingual BEIR dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("BSHAREDRAG_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRODUCTS = {
    "p1": ("Acme Kettle 1.7L", ["boils water in three minutes", "the lid is stainless steel", "cord is 75 cm long"],
           "how long does it take to boil?", "It boils water in about three minutes."),
    "p2": ("Zeta Phone Case", ["fits the zeta phone 12 only", "made of soft silicone", "available in red and blue"],
           "does it fit the zeta 11?", "No, it fits only the Zeta Phone 12."),
    "p3": ("Nova Desk Lamp", ["has three brightness levels", "uses a usb-c cable", "the arm bends 180 degrees"],
           "how is the lamp powered?", "It is powered through a USB-C cable."),
    "p4": ("Orbit Yoga Mat", ["six millimetres thick", "non slip rubber surface", "comes with a carry strap"],
           "is the mat slippery?", "No, the rubber surface is non slip."),
    "p5": ("Lumo Backpack", ["holds a 15 inch laptop", "water resistant fabric", "two side bottle pockets"],
           "will my 15 inch laptop fit?", "Yes, it holds a 15 inch laptop."),
    "p6": ("电热水壶 快煮壶", ["三分钟烧开一壶水", "壶身是不锈钢材质", "电源线长七十五厘米"],
           "烧开水需要多长时间？", "大约三分钟就能烧开。"),
    "p7": ("无线蓝牙耳机", ["续航时间长达八小时", "支持快速充电", "佩戴舒适不掉落"],
           "耳机续航多久？", "续航时间大约八小时。"),
    "p8": ("Kite Water Bottle", ["keeps drinks cold for 24 hours", "holds 750 ml", "dishwasher safe lid"],
           "how long does it keep water cold?", "It keeps drinks cold for 24 hours."),
}


def write_dataset(folder: Path, broken_line: bool = False) -> Path:
    """A BEIR folder: 3 passages per product, one question per product, train and dev qrels."""
    (folder / "qrels").mkdir(parents=True)
    corpus, queries, qrels = [], [], {"train": [], "dev": []}
    for n, (product, (title, passages, question, answer)) in enumerate(PRODUCTS.items()):
        for i, text in enumerate(passages):
            corpus.append({"_id": f"{product}-d{i}", "title": title, "text": text, "product_id": product})
        split = "dev" if n % 4 == 3 else "train"
        queries.append({"_id": f"{product}-q", "text": f"{title}: {question}", "question": question,
                        "product_id": product, "answers": [answer], "split": split})
        qrels[split].append(f"{product}-q\t{product}-d0\t2")
    lines = [json.dumps(row, ensure_ascii=False) for row in corpus]
    if broken_line:
        lines.insert(2, '{"_id": "broken", "text": ')
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "queries.jsonl").write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in queries) + "\n",
                                          encoding="utf-8")
    for split, rows in qrels.items():
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "shop")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama over the real SmolLM2 vocabulary, saved like any Hugging Face model folder."""
    from tiny import tiny_backbone

    folder = tmp_path_factory.mktemp("tiny-model")
    backbone = tiny_backbone()
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return folder


def tiny_overrides(model_dir: Path, data_dir: Path, run_dir: Path) -> list[str]:
    """Settings that run every stage of the pipeline on the tiny model and dataset in seconds."""
    train = [{"path": str(data_dir), "split": "train"}]
    return [
        f"run_dir={run_dir}",
        f"backbone.model={model_dir}",
        "backbone.precision=fp32",
        f"pretrain.datasets={json.dumps([str(data_dir)])}",
        "pretrain.seq_len=32", "pretrain.batch_size=2", "pretrain.max_tokens=null", "pretrain.heldout_fraction=0.3",
        f"retriever.datasets={json.dumps([{**train[0], 'judged_per_product': True}])}",
        "retriever.batch_size=4", "retriever.micro_batch_size=2", "retriever.max_steps=3", "retriever.epochs=3", "retriever.lora.r=4",
        "mine.num_negatives=2", "mine.rank_window=[0,10]",
        f"generator.datasets={json.dumps(train)}",
        "generator.batch_size=2", "generator.micro_batch_size=1", "generator.max_steps=2", "generator.lora.r=4", "generator.max_answer_len=16",
        f"index.corpus={data_dir}", f"eval.data={data_dir}", "eval.split=dev", "eval.max_new_tokens=8", "eval.systems=[bsharedrag,bm25]",
    ]
