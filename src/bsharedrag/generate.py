"""Token-by-token generation on the shared backbone, streamed as text chunks.

Llama-family models (Llama, SmolLM, Qwen2) decode through a lean loop that calls the model's own
modules (so LoRA layers apply) with a preallocated KV cache: transformers' generic forward spends
more time on Python bookkeeping and on growing its cache with `torch.cat` than on the matmuls of a
135M model. Other architectures use the generic forward with transformers' cache.

The prompt is encoded under the backbone's autocast; single-token decode steps always run in fp32,
because autocast re-casts every weight at every step, which makes batch-1 CPU decoding slower
(see `scripts/bench_generate.py`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .prompt import turn_end_id

if TYPE_CHECKING:
    from .backbone import SharedBackbone

__all__ = ["IncrementalDecoder", "generate", "stop_token_ids", "stream_tokens"]

_LEAN_MODEL_TYPES = ("llama", "qwen2")
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa


class IncrementalDecoder:
    """Turns token ids into text chunks, decoding only a short window per token.

    A chunk is released once its text is stable: a character split over several byte tokens shows as
    U+FFFD until its last byte arrives, and some tokenizers change the text of a token by what
    precedes it, so each chunk is the difference between decoding a window with and without the new tokens.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this are already emitted as text

    def _text(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly stable text (possibly empty)."""
        self.ids.append(token_id)
        before = self._text(self._prefix, self._read)
        after = self._text(self._prefix, len(self.ids))
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text still held back (an unfinished character stays as U+FFFD)."""
        before = self._text(self._prefix, self._read)
        after = self._text(self._prefix, len(self.ids))
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """EOS, the chat template's end-of-turn token, and the model's generation-config EOS ids."""
    stops = {turn_end_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        stops.update(configured if isinstance(configured, list) else [configured])
    return stops


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> int:
    """Pick the next token from (vocab,) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=rng)])
    return int(torch.multinomial(probs, 1, generator=rng))


class _LeanDecoder:
    """A Llama-style forward pass with a preallocated KV cache (batch 1)."""

    def __init__(self, model, max_len: int, device):
        self.core = model.model
        self.lm_head = model.lm_head
        self.layers = list(self.core.layers)
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        n_kv = model.config.num_key_value_heads
        positions = torch.arange(max_len, device=device)[None]
        probe = torch.empty(0, device=device, dtype=torch.float32)
        self.cos, self.sin = self.core.rotary_emb(probe, positions)  # (1, max_len, head_dim)
        shape = (1, n_kv, max_len, self.head_dim)
        self.keys = [torch.empty(shape, device=device) for _ in self.layers]
        self.values = [torch.empty(shape, device=device) for _ in self.layers]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (vocab,) after the tokens `ids` (1, t) placed at positions start..start+t-1."""
        length = ids.shape[1]
        end = start + length
        cos, sin = self.cos[:, None, start:end], self.sin[:, None, start:end]  # (1, 1, t, head_dim)
        x = self.core.embed_tokens(ids)  # (1, t, hidden)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            q = attention.q_proj(h).view(1, length, -1, self.head_dim).transpose(1, 2)  # (1, heads, t, hd)
            k = attention.k_proj(h).view(1, length, -1, self.head_dim).transpose(1, 2)  # (1, kv_heads, t, hd)
            v = attention.v_proj(h).view(1, length, -1, self.head_dim).transpose(1, 2)
            keys[:, :, start:end] = self._rotate(k, cos, sin)
            values[:, :, start:end] = v
            out = F.scaled_dot_product_attention(
                self._rotate(q, cos, sin).to(keys.dtype),
                keys[:, :, :end],
                values[:, :, :end],
                is_causal=length > 1,  # a prompt starts at 0, so the causal mask is square
                scale=attention.scaling,
                enable_gqa=True,
            )
            x = x + attention.o_proj(out.transpose(1, 2).reshape(1, length, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.core.norm(x[:, -1]))[0]


class _CachedDecoder:
    """The generic path: the model's own forward with a transformers cache."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        # transformers 5 renamed `past_key_values` to `cache`; the old name only warns until 5.40.
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache_argument = name

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        kwargs = {self.cache_argument: self.cache}
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).logits[0, -1]


def _decoder(backbone: SharedBackbone, max_len: int):
    model = backbone.base
    config = model.config
    lean = (
        getattr(config, "model_type", None) in _LEAN_MODEL_TYPES
        and hasattr(getattr(model, "model", None), "rotary_emb")
        and _SDPA_HAS_GQA
    )
    return _LeanDecoder(model, max_len, backbone.device) if lean else _CachedDecoder(model)


def stream_tokens(
    backbone: SharedBackbone,
    prompt_ids: list[int],
    max_new_tokens: int,
    adapter: str | None = "generator",
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield the answer to `prompt_ids` as text chunks while it is generated; stops at EOS or end of turn.

    Greedy at `temperature` 0, else nucleus sampling (`top_p`, seeded by `seed`). `adapter` (None: the
    bare base model) is active during each forward pass only, so code that runs between two chunks may
    use the backbone with another adapter.
    """
    if not prompt_ids:
        raise ValueError("`prompt_ids` is empty; build the prompt with bsharedrag.prompt.build_prompt")
    if max_new_tokens <= 0:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if adapter is not None and adapter not in backbone.adapters:
        raise KeyError(f"unknown adapter {adapter!r}; known adapters: {backbone.adapters or 'none'}")
    rng = torch.Generator(device=backbone.device).manual_seed(seed) if seed is not None else None
    pick = functools.partial(_next_token, temperature=temperature, top_p=top_p, rng=rng)
    return _stream(backbone, prompt_ids, max_new_tokens, adapter, pick)


def _stream(backbone: SharedBackbone, prompt_ids: list[int], max_new_tokens: int, adapter, pick) -> Iterator[str]:
    stops = stop_token_ids(backbone.tokenizer, backbone.base)
    text = IncrementalDecoder(backbone.tokenizer)
    # Inference mode and the adapter are entered per forward pass, never held across a `yield`:
    # they are thread state, and the consumer runs its own code between two chunks.
    with torch.inference_mode(), backbone.adapter(adapter), backbone.autocast_context():
        step = _decoder(backbone, len(prompt_ids) + max_new_tokens)
        token = pick(step(torch.tensor([prompt_ids], device=backbone.device), 0))
    for position in range(len(prompt_ids), len(prompt_ids) + max_new_tokens):
        if token in stops:
            break
        chunk = text.push(token)
        if chunk:
            yield chunk
        if position == len(prompt_ids) + max_new_tokens - 1:
            break
        with torch.inference_mode(), backbone.adapter(adapter):
            token = pick(step(torch.tensor([[token]], device=backbone.device), position))
    tail = text.flush()
    if tail:
        yield tail


def generate(backbone: SharedBackbone, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> str:
    """The whole answer to `prompt_ids` as one string (see `stream_tokens` for the options)."""
    return "".join(stream_tokens(backbone, prompt_ids, max_new_tokens, **kwargs))
