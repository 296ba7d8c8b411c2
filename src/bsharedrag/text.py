"""Word tokenisation wherever words are counted (BM25, BLEU, ROUGE): jieba for Chinese, words elsewhere."""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["has_cjk", "words"]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"\w+", re.UNICODE)


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def words(text: str, lower: bool = True) -> list[str]:
    """Split text into words: Chinese runs are segmented with jieba, other scripts on word characters."""
    if lower:
        text = text.lower()
    if not has_cjk(text):
        return _WORD.findall(text)
    return [token for piece in _jieba().lcut(text) for token in _WORD.findall(piece)]
