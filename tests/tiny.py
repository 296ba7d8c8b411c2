"""Tiny CPU stand-ins for tests: the real SmolLM2 tokenizer (offline copy) on a 2-layer random Llama."""

from __future__ import annotations

import functools
from pathlib import Path

from bsharedrag.model.backbone import SharedBackbone
from bsharedrag.data import Document
from bsharedrag.model.index import Hit

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"  # SmolLM2-135M-Instruct's tokenizer (Apache-2.0)


@functools.lru_cache(maxsize=1)
def _load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_tokenizer(chat_template: bool = True):
    """The SmolLM2 tokenizer (shared, do not modify); `chat_template=False` gives a copy without its template."""
    if chat_template:
        return _load_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = None
    return tokenizer


def tiny_backbone(seed: int = 0, model_type: str = "llama", chat_template: bool = True, hidden_size: int = 32
                  ) -> SharedBackbone:
    """A random 2-layer model over the real vocabulary, wrapped as a fp32 CPU SharedBackbone (2 heads of
    `hidden_size` / 2)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer(chat_template)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.2,  # larger than the default 0.02, so a 32-wide model can make peaked logits
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return SharedBackbone(model, tokenizer, "cpu", None)


def make_doc(number: int, text: str | None = None, title: str | None = None) -> Document:
    return Document(f"d{number}", title if title is not None else f"Product {number}", text or f"fact number {number}")


class FakeRetriever:
    """Returns the same ranked documents for every question, recording each call."""

    def __init__(self, documents: list[Document]):
        self.documents = documents
        self.calls: list[tuple[list[str], int, str | None]] = []

    def search(self, questions: list[str], top_k: int, product_id: str | None = None) -> list[list[Hit]]:
        self.calls.append((list(questions), top_k, product_id))
        hits = [Hit(doc, 1.0 - rank / 100) for rank, doc in enumerate(self.documents[:top_k])]
        return [list(hits) for _ in questions]
