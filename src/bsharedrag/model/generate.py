"""Token-by-token generation on the shared backbone, streamed as text chunks.

Llama-family models (Llama, SmolLM, Qwen2) decode through a lean loop over the model's own weights
(with the active LoRA applied as x A^T B^T, never merged) and a preallocated KV cache. For a 135M
model on a CPU, transformers' generic forward and peft's layer dispatch cost more than the matmuls:
on a 30-layer model of negligible width, that overhead measured about 10 ms a token (24 ms with a
LoRA active) against about 3 ms (4 ms) for the lean loop, which also never grows its cache with
`torch.cat`. Other architectures use the generic forward with transformers' cache.

The prompt is encoded under the backbone's autocast (bf16 where the hardware has it: faster time to
first token); single-token decode steps always run in fp32, because autocast re-casts every weight
at every step, which makes batch-1 CPU decoding several times slower (see `scripts/bench_generate.py`).

Answers streamed at the same time are decoded together (continuous batching, `DecodeBatch`): each
decode step is one forward pass over every running answer, which reads the weights once for all of
them. Each answer keeps its own KV cache (ragged, no padding): the projections and the MLP run over
all rows at once, attention per row over its own length. Prompts are prefilled one at a time, as
they join at a step boundary: prefill is compute-bound, so batching prompts would save little.
"""

from __future__ import annotations

import collections
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .prompt import turn_end_id

if TYPE_CHECKING:
    from .backbone import SharedBackbone

__all__ = [
    "GREEDY_BELOW", "DecodeBatch", "IncrementalDecoder", "decode_batch", "generate", "kv_cache_bytes", "stop_token_ids",
    "stream_tokens",
]

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


# Temperatures this small are greedy decoding in all but name; dividing float32 logits by them overflows
# (1e-300 rounds to 0 in float32 and the probabilities turn NaN), so they decode greedily.
GREEDY_BELOW = 1e-4


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> int:
    """Pick the next token from (vocab,) logits: greedy below `GREEDY_BELOW` (0 included), else nucleus sampling."""
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=rng)])
    return int(torch.multinomial(probs, 1, generator=rng))


def _linear(module: torch.nn.Module, adapter: str | None):
    """`module` as a plain function of x: its base weights plus the adapter's LoRA term, if it has one.

    Calling torch.mm directly skips the module, peft and F.linear dispatch, which together cost more
    than the matmul itself for batch-1 decoding. Layers this cannot express (DoRA, merged adapters) run themselves.
    """
    base = getattr(module, "base_layer", module)
    if not isinstance(base, torch.nn.Linear) or getattr(module, "merged", False):
        return module
    weight_t, bias = base.weight.t(), base.bias  # (in, out) views, made once per generation
    if adapter is not None and adapter in getattr(module, "lora_A", {}):
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "fan_in_fan_out", False):
            return module
        down = (module.lora_A[adapter].weight * module.scaling[adapter]).t()  # (in, r)
        up = module.lora_B[adapter].weight.t()  # (r, out)
        if bias is None:
            return lambda x: torch.addmm(torch.mm(x, weight_t), torch.mm(x, down), up)  # x: (tokens, in)
        return lambda x: torch.addmm(torch.addmm(bias, x, weight_t), torch.mm(x, down), up)
    if bias is None:
        return lambda x: torch.mm(x, weight_t)
    return lambda x: torch.addmm(bias, x, weight_t)


def _half_turn(dim: int, dtype, device) -> torch.Tensor:
    """The (dim, dim) matrix P with x @ P == rotate_half(x) == cat(-x2, x1), as RoPE uses it."""
    half = torch.arange(dim // 2, device=device)
    turn = torch.zeros(dim, dim, dtype=dtype, device=device)
    turn[half + dim // 2, half] = -1
    turn[half, half + dim // 2] = 1
    return turn


def _norm(module: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """RMSNorm as (weight * sqrt(dim), eps * dim) for `_rms_norm`."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    dim = module.weight.shape[-1]
    return module.weight * dim**0.5, eps * dim


def _rms_norm(x: torch.Tensor, scaled_weight: torch.Tensor, scaled_eps: float) -> torch.Tensor:
    # x / sqrt(mean(x^2) + eps) * w == x / sqrt(sum(x^2) + eps*dim) * (w * sqrt(dim)): a sum instead of
    # a mean, which on CPU costs a division and two dtype copies; F.rms_norm is no faster there.
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + scaled_eps) * scaled_weight


class _LeanModel:
    """A Llama-style forward pass on 2-D (tokens, features) tensors over the model's own weights, with
    one preallocated KV cache per sequence: a handful of tensor ops per layer instead of transformers'
    general machinery. `__call__` runs the tokens of one sequence (a prompt, or one decoding step);
    `rows` runs one new token of each of several sequences in one batched pass."""

    def __init__(self, model, adapter: str | None, device):
        core, config = model.model, model.config
        self.device = device
        self.embed = core.embed_tokens
        self.final_norm = _norm(core.norm)
        self.head = _linear(model.lm_head, adapter)
        self.layers = [
            (
                _norm(layer.input_layernorm),
                [_linear(getattr(layer.self_attn, f"{name}_proj"), adapter) for name in "qkvo"],
                _norm(layer.post_attention_layernorm),
                [_linear(getattr(layer.mlp, f"{name}_proj"), adapter) for name in ("gate", "up", "down")],
                layer.mlp.act_fn,
            )
            for layer in core.layers
        ]
        self.rotary_emb = core.rotary_emb
        self.head_dim = core.layers[0].self_attn.head_dim
        self.scale = core.layers[0].self_attn.scaling
        self.n_kv = config.num_key_value_heads
        self.group = config.num_attention_heads // self.n_kv  # query heads per KV head
        self.dtype = self.embed.weight.dtype
        self.positions = 0  # RoPE tables cover positions below this
        self._cover(1)

    def _cover(self, positions: int) -> None:
        """RoPE tables for `positions` positions (grown as longer sequences join)."""
        if positions <= self.positions:
            return
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.rotary_emb(probe, torch.arange(positions, device=self.device)[None])  # (1, n, head_dim)
        self.cos, self.sin = cos[0, :, None], sin[0, :, None]  # (n, 1, head_dim)
        self.half_turn = _half_turn(self.head_dim, cos.dtype, self.device)
        self.positions = positions

    def new_cache(self, max_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Empty (keys, values) for one sequence of at most `max_len` tokens.

        Keys are stored transposed, (kv, head_dim, max_len), so q @ k^T reads a row-major slice.
        """
        self._cover(max_len)
        shape = (self.n_kv, self.head_dim, max_len), (self.n_kv, max_len, self.head_dim)
        keys = [torch.empty(shape[0], device=self.device, dtype=self.dtype) for _ in self.layers]
        values = [torch.empty(shape[1], device=self.device, dtype=self.dtype) for _ in self.layers]
        return keys, values

    def _rotary(self, start: int, end: int):
        """Functions applying RoPE to keys and queries (t, heads, head_dim) at positions start..end-1.

        Queries also take the attention scale. One decoding position folds the rotation into one
        (head_dim, head_dim) matrix, so each layer rotates with one matmul instead of five ops.
        """
        cos, sin = self.cos[start:end], self.sin[start:end]
        if end - start > 1:
            return (
                lambda k: k * cos + (k @ self.half_turn) * sin,
                lambda q: (q * cos + (q @ self.half_turn) * sin) * self.scale,
            )
        key_turn = torch.diag_embed(cos[0, 0]) + self.half_turn * sin[0]  # x @ key_turn == x*cos + rotate_half(x)*sin
        query_turn = key_turn * self.scale
        return (lambda k: k @ key_turn), (lambda q: q @ query_turn)

    def _attend_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention output (t, heads * head_dim) of a prompt over itself: scaled queries
        (t, heads, head_dim), keys and values (t, kv, head_dim).

        The prompt starts at position 0, so it attends only to its own tokens, and they are passed as
        fresh contiguous tensors: given the transposed cache, SDPA falls back from its fused CPU
        kernel to the reference one, which made prefill about 1.4x slower.
        """
        length = q.shape[0]
        q, k, v = (t.transpose(0, 1)[None].to(v.dtype).contiguous() for t in (q, k, v))  # bf16 under autocast
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(length, -1)

    def _attend_step(self, q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention output (1, heads * head_dim) of one scaled query (1, heads, head_dim) over the
        cache: `keys_t` is (kv, head_dim, seen) and `values` (kv, seen, head_dim)."""
        q = q.view(self.n_kv, self.group, self.head_dim)  # head h reads KV head h // group
        weights = torch.softmax(torch.bmm(q, keys_t), dim=-1)  # (kv, group, seen)
        return torch.bmm(weights, values).view(1, -1)

    def __call__(self, ids: torch.Tensor, start: int, cache) -> torch.Tensor:
        """Logits (vocab,) after the tokens `ids` (t,) of one sequence placed at positions start..start+t-1."""
        length = ids.shape[0]
        end = start + length
        rotate_keys, rotate_queries = self._rotary(start, end)
        x = self.embed(ids)  # (t, hidden)
        for layer, keys, values in zip(self.layers, *cache):
            norm_in, (q_proj, k_proj, v_proj, o_proj), norm_mid, (gate, up, down), act = layer
            h = _rms_norm(x, *norm_in)
            k = rotate_keys(k_proj(h).view(length, -1, self.head_dim))  # (t, kv, head_dim)
            v = v_proj(h).view(length, -1, self.head_dim)
            keys[:, :, start:end] = k.permute(1, 2, 0)
            values[:, start:end] = v.transpose(0, 1)
            q = rotate_queries(q_proj(h).view(length, -1, self.head_dim))  # (t, heads, head_dim)
            if length > 1:  # a prompt, which starts at position 0
                attended = self._attend_prompt(q, k, v)
            else:
                attended = self._attend_step(q, keys[:, :, :end], values[:, :end])
            x = x + o_proj(attended)
            h = _rms_norm(x, *norm_mid)
            x = x + down(act(gate(h)) * up(h))
        return self.head(_rms_norm(x[-1:], *self.final_norm))[0]

    def rows(self, tokens: torch.Tensor, positions: list[int], caches: list) -> torch.Tensor:
        """Logits (rows, vocab) after one token per sequence: `tokens[i]` at `positions[i]` of `caches[i]`.

        Every projection and the MLP run once over all rows (decoding reads the weights once for the
        whole batch); attention runs per row over that row's own cache, so sequences of any length
        share a step without padding.
        """
        rows = tokens.shape[0]
        at = torch.tensor(positions, device=self.device)
        cos, sin = self.cos[at], self.sin[at]  # (rows, 1, head_dim)
        x = self.embed(tokens)  # (rows, hidden)
        for layer_index, layer in enumerate(self.layers):
            norm_in, (q_proj, k_proj, v_proj, o_proj), norm_mid, (gate, up, down), act = layer
            h = _rms_norm(x, *norm_in)
            k = k_proj(h).view(rows, -1, self.head_dim)
            k = k * cos + (k @ self.half_turn) * sin  # (rows, kv, head_dim)
            v = v_proj(h).view(rows, -1, self.head_dim)
            q = q_proj(h).view(rows, -1, self.head_dim)
            q = (q * cos + (q @ self.half_turn) * sin) * self.scale  # (rows, heads, head_dim)
            attended = []
            for row, ((keys, values), position) in enumerate(zip(caches, positions)):
                keys, values = keys[layer_index], values[layer_index]
                keys[:, :, position] = k[row]
                values[:, position] = v[row]
                attended.append(self._attend_step(q[row : row + 1], keys[:, :, : position + 1], values[:, : position + 1]))
            x = x + o_proj(torch.cat(attended))
            h = _rms_norm(x, *norm_mid)
            x = x + down(act(gate(h)) * up(h))
        return self.head(_rms_norm(x, *self.final_norm))


class _GenericModel:
    """The generic path: the model's own forward with one transformers cache per sequence; `rows`
    runs the sequences one after another (architectures other than Llama's are not batched)."""

    def __init__(self, model):
        self.model = model
        # transformers 5 renamed `past_key_values` to `cache`; the old name only warns until 5.40.
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache_argument = name

    def new_cache(self, max_len: int):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def __call__(self, ids: torch.Tensor, start: int, cache) -> torch.Tensor:
        kwargs = {self.cache_argument: cache}
        return self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1, **kwargs).logits[0, -1]

    def rows(self, tokens: torch.Tensor, positions: list[int], caches: list) -> torch.Tensor:
        return torch.stack([self(tokens[i : i + 1], positions[i], cache) for i, cache in enumerate(caches)])


def _is_lean(model) -> bool:
    config = model.config
    return (
        getattr(config, "model_type", None) in _LEAN_MODEL_TYPES
        and not getattr(config, "use_sliding_window", False)  # the lean loop attends to every position
        and hasattr(getattr(model, "model", None), "rotary_emb")
        and _SDPA_HAS_GQA
    )


def _forward_model(backbone: SharedBackbone, adapter: str | None):
    model = backbone.base
    return _LeanModel(model, adapter, backbone.device) if _is_lean(model) else _GenericModel(model)


def kv_cache_bytes(backbone: SharedBackbone, tokens: int) -> int:
    """Bytes of the KV cache that one sequence of `tokens` tokens holds while it is decoded."""
    config = backbone.base.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = backbone.base.get_input_embeddings().weight.element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element * tokens


@dataclass(eq=False)
class _Sequence:
    """One answer being decoded: its cache, the next token to feed, and the text not yet taken."""

    cache: object
    pick: Callable[[torch.Tensor], int]
    stops: set[int]
    text: IncrementalDecoder
    position: int  # where `token` goes when it is fed
    left: int  # tokens it may still generate
    token: int = -1
    chunks: collections.deque = field(default_factory=collections.deque)
    done: bool = False
    error: BaseException | None = None

    def accept(self, token: int) -> None:
        """Take the token just picked: its text, or the end of the answer."""
        self.left -= 1
        if token in self.stops:
            self.finish()
            return
        if chunk := self.text.push(token):
            self.chunks.append(chunk)
        self.token = token
        if self.left == 0:
            self.finish()

    def finish(self) -> None:
        if tail := self.text.flush():
            self.chunks.append(tail)
        self.done, self.cache = True, None  # the cache is freed at once, before its text is read


class DecodeBatch:
    """The answers being decoded on one backbone with one adapter, advanced together.

    A sequence joins with its prompt (prefilled alone, under the backbone's autocast) and leaves
    when it ends, when its reader closes its stream, or when a step fails. `step()` feeds the last
    token of every running sequence in one batched forward pass (fp32, see the module docstring),
    so a batch of answers costs about one weight read per token instead of one per answer. A
    sequence running alone takes the batch-1 path, which is as fast as it was before batching.
    """

    def __init__(self, backbone: SharedBackbone, adapter: str | None):
        self.backbone = backbone
        self.adapter = adapter
        self.running: list[_Sequence] = []
        self._model = None  # built when the batch fills, dropped when it empties (adapters may change between)

    def _forward(self):
        if self._model is None:
            self._model = _forward_model(self.backbone, self.adapter)
        return self._model

    def join(self, prompt_ids: list[int], max_new_tokens: int, pick: Callable[[torch.Tensor], int]) -> _Sequence:
        """Prefill `prompt_ids` and pick the first token; the sequence runs from now on."""
        backbone = self.backbone
        with torch.inference_mode(), backbone.adapter(self.adapter), backbone.autocast_context():
            model = self._forward()
            sequence = _Sequence(
                model.new_cache(len(prompt_ids) + max_new_tokens), pick,
                stop_token_ids(backbone.tokenizer, backbone.base), IncrementalDecoder(backbone.tokenizer),
                position=len(prompt_ids), left=max_new_tokens,
            )
            logits = model(torch.tensor(prompt_ids, device=backbone.device), 0, sequence.cache)
        sequence.accept(pick(logits))
        if not sequence.done:
            self.running.append(sequence)
        return sequence

    def step(self) -> None:
        """Feed every running sequence its last token and pick its next one, in one forward pass."""
        rows = self.running
        if not rows:
            return
        try:
            with torch.inference_mode(), self.backbone.adapter(self.adapter):
                model = self._forward()
                tokens = torch.tensor([row.token for row in rows], device=self.backbone.device)
                positions = [row.position for row in rows]
                if len(rows) == 1:
                    logits = model(tokens, positions[0], rows[0].cache)[None]
                else:
                    logits = model.rows(tokens, positions, [row.cache for row in rows])
                picked = [row.pick(row_logits) for row, row_logits in zip(rows, logits)]
        except Exception as error:  # a failed step fails every answer in it, and nothing else
            for row in rows:
                row.error = error
                row.finish()
            self._keep([])
            raise
        for row, token in zip(rows, picked):
            row.position += 1
            row.accept(token)
        self._keep([row for row in rows if not row.done])

    def leave(self, sequence: _Sequence) -> None:
        """Stop decoding `sequence` (its reader is gone) and free its cache."""
        if sequence in self.running:
            sequence.finish()
            self._keep([row for row in self.running if row is not sequence])

    def _keep(self, rows: list[_Sequence]) -> None:
        """`rows` run on; an empty batch drops its forward model (adapters may change before the next answer)."""
        self.running = rows
        if not rows:
            self._model = None


def decode_batch(backbone: SharedBackbone, adapter: str | None) -> DecodeBatch:
    """The batch of answers decoded on `backbone` with `adapter`: every stream of them joins this one."""
    batches = backbone.decode_batches
    if adapter not in batches:
        batches[adapter] = DecodeBatch(backbone, adapter)
    return batches[adapter]


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

    Greedy at `temperature` 0 (and below `GREEDY_BELOW`), else nucleus sampling (`top_p`, seeded by `seed`). `adapter` (None: the
    bare base model) is active during each forward pass only, so code that runs between two chunks may
    use the backbone with another adapter.

    Streams open at the same time on one backbone and adapter are decoded together (`DecodeBatch`):
    reading the next chunk of any of them advances all of them by one token.
    """
    if not prompt_ids:
        raise ValueError("`prompt_ids` is empty; build the prompt with bsharedrag.model.prompt.build_prompt")
    if max_new_tokens <= 0:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if adapter is not None and adapter not in backbone.adapters:
        raise KeyError(f"unknown adapter {adapter!r}; known adapters: {backbone.adapters or 'none'}")
    rng = torch.Generator(device=backbone.device).manual_seed(seed) if seed is not None else None
    pick = functools.partial(_next_token, temperature=temperature, top_p=top_p, rng=rng)
    return _stream(decode_batch(backbone, adapter), prompt_ids, max_new_tokens, pick)


def _stream(batch: DecodeBatch, prompt_ids: list[int], max_new_tokens: int, pick) -> Iterator[str]:
    # Inference mode and the adapter are entered per forward pass, never held across a `yield`:
    # they are thread state, and the consumer runs its own code between two chunks.
    sequence = batch.join(prompt_ids, max_new_tokens, pick)
    try:
        while True:
            while sequence.chunks:
                yield sequence.chunks.popleft()
            if sequence.done:
                break
            batch.step()
        if sequence.error is not None:
            raise sequence.error
    finally:
        batch.leave(sequence)


def generate(backbone: SharedBackbone, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> str:
    """The whole answer to `prompt_ids` as one string (see `stream_tokens` for the options)."""
    return "".join(stream_tokens(backbone, prompt_ids, max_new_tokens, **kwargs))
