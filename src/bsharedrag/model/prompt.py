"""The one place the RAG prompt is built: numbered passages, the question, and where the answer starts.

A prompt is the system prompt plus one user turn (`GeneratorConfig.user_template` filled with the
numbered passages `[1] title: text`, each quoted onto one line by `quote_passage`, and the question), rendered with the tokenizer's chat template
when it has one and as plain `System: ... / Question: ... / Answer:` text otherwise. Each passage is
cut to `max_passage_tokens`; when the whole prompt is still longer than `max_prompt_len`, the last
passage is shortened, then dropped, and so on towards the first. The question is never cut: a
question longer than the budget on its own gives a prompt over `max_prompt_len`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import GeneratorConfig
from ..data import Document
from ..text import has_cjk

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CLOSED_BOOK_SYSTEM_PROMPT",
    "Prompt",
    "abstention_answer",
    "build_prompt",
    "citation_marker",
    "document_end_id",
    "drop_foreign_citations",
    "encode_answer",
    "encode_prompt",
    "is_abstention",
    "open_citation_start",
    "parse_citations",
    "quote_passage",
    "turn_end_id",
]

CLOSED_BOOK_SYSTEM_PROMPT = "You are a shop assistant. Answer the customer's question in one or two sentences."
# A passage cut shorter than this says too little to be worth its number; it is dropped instead.
_MIN_PASSAGE_TOKENS = 16
# Tokens that close an assistant turn in common chat templates (ChatML, Llama 3, Phi-3).
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")
# Tokens that end a document in pre-training text, by model family.
_END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>")
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_OPEN_CITATION = re.compile(r"\[[\d,\s]{0,16}")  # "[", "[1", "[1, " ... : a marker not closed yet


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    n_passages: int  # how many of the given passages made it into the prompt, numbered 1..n_passages


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    # A cut can split a multi-byte character; drop the replacement character it leaves.
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip()


def _render(tokenizer: PreTrainedTokenizerBase, system: str, user: str) -> list[int]:
    if not _has_chat_template(tokenizer):
        return tokenizer(f"System: {system}\n\n{user}\n\nAnswer:")["input_ids"]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - some templates (e.g. Gemma's) raise on a system turn
        merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
        text = tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
    return _token_ids(tokenizer, text)  # the rendered text already holds the special tokens


def quote_passage(text: str) -> str:
    """Passage text as inert data: one line, with its own `[n]` markers turned into `(n)`.

    Catalogue text comes from outside (a shop's import, an upsert), so it must not be able to shape the
    prompt: on one line it cannot open a numbered block of its own or a `Question:` line, and without
    brackets it cannot forge a citation. Special tokens were already dropped when it was decoded.
    """
    return _CITATION.sub(lambda match: f"({match.group(1)})", " ".join(text.split()))


def _user_turn(tokenizer, question: str, bodies: list[list[int]], settings: GeneratorConfig) -> str:
    blocks = "\n".join(f"[{number}] {quote_passage(_decode(tokenizer, body))}"
                       for number, body in enumerate(bodies, 1))
    try:
        return settings.user_template.format(passages=blocks or "(none)", question=question)
    except (KeyError, IndexError) as error:
        raise ValueError(
            f"`user_template` may only use the fields {{passages}} and {{question}}, "
            f"got {settings.user_template!r}"
        ) from error


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, passages: list[Document], settings: GeneratorConfig
) -> Prompt:
    """Token ids of the prompt ending where the answer starts, and how many passages it holds."""
    question = question.strip()  # checked at the boundary: `RAG`'s methods, the serving schemas, the data readers
    if not settings.with_passages:
        return Prompt(_render(tokenizer, CLOSED_BOOK_SYSTEM_PROMPT, f"Question: {question}"), 0)
    bodies = [_token_ids(tokenizer, doc.content)[: settings.max_passage_tokens] for doc in passages]
    while True:
        ids = _render(tokenizer, settings.system_prompt, _user_turn(tokenizer, question, bodies, settings))
        excess = len(ids) - settings.max_prompt_len
        if excess <= 0 or not bodies:
            return Prompt(ids, len(bodies))
        keep = len(bodies[-1]) - excess
        if keep >= _MIN_PASSAGE_TOKENS:
            bodies[-1] = bodies[-1][:keep]  # re-tokenising may add a token or two; the next round trims them
        else:
            bodies.pop()


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, passages: list[Document], settings: GeneratorConfig
) -> list[int]:
    """Token ids of the prompt for `question` over `passages`, ending where the answer starts."""
    return encode_prompt(tokenizer, question, passages, settings).ids


def turn_end_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an answer: the chat template's end-of-turn token, else EOS."""
    if _has_chat_template(tokenizer):
        vocab = tokenizer.get_vocab()
        for token in _TURN_END_TOKENS:
            if token in vocab:
                return vocab[token]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn token nor an EOS token to end answers with")
    return tokenizer.eos_token_id


def document_end_id(tokenizer: PreTrainedTokenizerBase, setting: str = "eos") -> int:
    """The token that ends a document: after each passage packed for continual pre-training, and after
    each text the retriever embeds (its last-token pooling reads the hidden state there).

    EOS by default. With `setting` "end_of_text", EOS unless it is also the chat template's end of turn
    (as in SmolLM2-Instruct and Qwen2.5-Instruct: `<|im_end|>`), in which case the vocabulary's
    end-of-text token, the one its pre-training put between documents. Ending every catalogue passage,
    many a bare "Yes.", with the end of turn teaches the model to stop early after a short answer, but
    it is also what makes that token a good summary to pool on: with end-of-text for both, the quick
    profile's retriever ended its training at a loss of 2.37 against 0.57 (docs/results.md, 2026-12-08).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to end documents with")
    if setting == "eos" or not _has_chat_template(tokenizer) or eos != turn_end_id(tokenizer):
        return eos
    vocab = tokenizer.get_vocab()
    return next((vocab[token] for token in _END_OF_TEXT_TOKENS if vocab.get(token, eos) != eos), eos)


def encode_answer(tokenizer: PreTrainedTokenizerBase, text: str, settings: GeneratorConfig) -> list[int]:
    """Answer token ids as the model should produce them after the prompt: text, then the end token.

    Cut to `max_answer_len`; an answer cut short loses its end token, so the model is never taught
    to stop mid-sentence.
    """
    # The plain format ends with "Answer:", so the answer's first word carries its leading space.
    text = text.strip() if _has_chat_template(tokenizer) else " " + text.strip()
    return (_token_ids(tokenizer, text) + [turn_end_id(tokenizer)])[: settings.max_answer_len]


def citation_marker(numbers: list[int]) -> str:
    """The citation text appended to a training answer, e.g. "[2]" or "[1][3]"."""
    return "".join(f"[{number}]" for number in numbers)


def drop_foreign_citations(text: str, n_passages: int) -> str:
    """`text` with every citation of a passage outside 1..n_passages removed ("[1, 7]" -> "[1]", "[7]" -> "")."""
    def keep(match: re.Match) -> str:
        numbers = [part.strip() for part in match.group(1).split(",") if 1 <= int(part) <= n_passages]
        return f"[{', '.join(numbers)}]" if numbers else ""

    return _CITATION.sub(keep, text)


def open_citation_start(text: str) -> int:
    """Where a citation that may still be completing by later text starts at the end of `text`, else len(text)."""
    start = text.rfind("[")
    if start >= 0 and _OPEN_CITATION.fullmatch(text, start):
        return start
    return len(text)


_ABSTENTION = re.compile(
    r"\b(do|does|did)(n't| not) (say|mention|state|specify|tell)|\bnot (mentioned|stated|specified|said)"
    r"|\bno (information|passage|mention)|\bcannot (answer|tell|say)|没有提到|未提及|无法回答|没有.{0,8}信息",
    re.IGNORECASE,
)


def abstention_answer(question: str) -> str:
    """The answer the generator is trained to give when its passages do not answer the question."""
    return "资料中没有提到。" if has_cjk(question) else "The passages do not say."


def is_abstention(answer: str) -> bool:
    """Whether `answer` declines for want of support (the trained phrase or a common paraphrase of it)."""
    return bool(_ABSTENTION.search(answer))


def parse_citations(answer_text: str, n_passages: int) -> list[int]:
    """Passage numbers cited as [1], [2] or [1, 3] in `answer_text`, in order of first mention.

    Numbers outside 1..n_passages refer to no given passage and are ignored.
    """
    cited: list[int] = []
    for match in _CITATION.finditer(answer_text):
        for part in match.group(1).split(","):
            number = int(part)
            if 1 <= number <= n_passages and number not in cited:
                cited.append(number)
    return cited
