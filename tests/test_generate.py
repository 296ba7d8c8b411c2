import pytest
import torch
from tiny import tiny_backbone, tiny_tokenizer

from bsharedrag.model import generate as generation
from bsharedrag.config import LoraSettings
from bsharedrag.model.generate import IncrementalDecoder, generate, stream_tokens

PROMPT = list(range(100, 140))


def _with_lora(model_type: str = "llama", targets="all-linear"):
    backbone = tiny_backbone(model_type=model_type)
    backbone.add_adapter("generator", LoraSettings(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the output
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return backbone


def _greedy_reference(backbone, n: int) -> list[int]:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(n):
            next_id = backbone.model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("text", ["plain words", "héllo wörld ümlaut", "你好，世界！ 价格是多少", "emoji 🙂👍🏽 end"])
def test_incremental_decoding_matches_decoding_everything(text):
    tokenizer = tiny_tokenizer()
    decoder = IncrementalDecoder(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(chunks) == tokenizer.decode(ids)
    assert not any("\ufffd" in chunk for chunk in chunks)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("adapter", [None, "generator"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"]])  # partly adapted groups
def test_lean_decoder_matches_the_transformers_forward(model_type, adapter, targets):
    backbone = _with_lora(model_type, targets)
    with torch.inference_mode(), backbone.adapter(adapter):
        lean, reference = generation._LeanModel(backbone.base, adapter, "cpu"), generation._GenericModel(backbone.base)
        lean_cache, reference_cache = lean.new_cache(len(PROMPT) + 8), reference.new_cache(len(PROMPT) + 8)
        tokens = torch.tensor(PROMPT)
        for position in [0, *range(len(PROMPT), len(PROMPT) + 8)]:
            ours, theirs = lean(tokens, position, lean_cache), reference(tokens, position, reference_cache)
            assert torch.allclose(ours, theirs, atol=1e-4)
            tokens = theirs.argmax().view(1)


@pytest.mark.parametrize("adapter", [None, "generator"])
def test_stream_is_greedy_decoding_of_the_active_adapter(adapter):
    backbone = _with_lora()
    with backbone.adapter(adapter):
        expected = backbone.tokenizer.decode(_greedy_reference(backbone, 12), skip_special_tokens=True)
    assert generate(backbone, PROMPT, 12, adapter=adapter) == expected


def test_stream_stops_at_a_stop_token(monkeypatch):
    backbone = _with_lora()
    greedy = _greedy_reference(backbone, 12)
    monkeypatch.setattr(generation, "stop_token_ids", lambda tokenizer, model=None: {greedy[3]})
    stop = greedy.index(greedy[3])
    assert generate(backbone, PROMPT, 12, adapter=None) == backbone.tokenizer.decode(greedy[:stop])


def test_adapter_is_only_active_inside_forward_passes():
    backbone = _with_lora()
    backbone.use(None)
    stream = stream_tokens(backbone, PROMPT, 6, adapter="generator")
    next(stream)
    assert backbone.active_adapter is None and not torch.is_inference_mode_enabled()
    list(stream)


def test_seeded_sampling_repeats():
    backbone = _with_lora()
    first = generate(backbone, PROMPT, 10, temperature=1.0, top_p=0.9, seed=3)
    assert first == generate(backbone, PROMPT, 10, temperature=1.0, top_p=0.9, seed=3)


def test_bad_arguments_raise_at_call_time():
    backbone = _with_lora()
    with pytest.raises(KeyError, match="known adapters"):
        stream_tokens(backbone, PROMPT, 4, adapter="retriever")
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream_tokens(backbone, PROMPT, 0)
    with pytest.raises(ValueError, match="prompt_ids"):
        stream_tokens(backbone, [], 4)


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 2.0])
def test_sampling_stays_finite_at_any_valid_temperature(temperature):
    logits = torch.tensor([3.0, 9.0, -4.0, 9.0 - 1e-3])
    picks = {generation._next_token(logits, temperature, 1.0, torch.Generator().manual_seed(s)) for s in range(20)}
    assert picks <= {0, 1, 2, 3}
    if temperature < 1e-20:
        assert picks == {1}  # tends to greedy


def _alone(backbone, prompt, n, adapter="generator", **sampling) -> list[str]:
    return list(stream_tokens(backbone, prompt, n, adapter=adapter, **sampling))


def _together(streams: dict, cancel: dict | None = None) -> dict[str, list[str]]:
    """Read every stream round-robin, one chunk at a time; `cancel[name] = k` closes that stream after k chunks."""
    cancel = cancel or {}
    out = {name: [] for name in streams}
    live = dict(streams)
    while live:
        for name, stream in list(live.items()):
            if len(out[name]) == cancel.get(name, -1):
                stream.close()
                del live[name]
                continue
            try:
                out[name].append(next(stream))
            except StopIteration:
                del live[name]
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])  # mistral: the generic, unbatched path
def test_answers_decoded_together_equal_answers_decoded_alone(model_type, monkeypatch):
    backbone = _with_lora(model_type)
    prompts = {"short": PROMPT[:7], "long": PROMPT, "middle": PROMPT[5:30], "cut": PROMPT[3:20], "late": PROMPT[9:]}
    lengths = {"short": 14, "long": 5, "middle": 9, "cut": 12, "late": 8}  # they finish at different steps
    alone = {name: _alone(backbone, prompt, lengths[name]) for name, prompt in prompts.items()}
    stepped = []
    batch = generation.decode_batch(backbone, "generator")
    monkeypatch.setattr(batch, "step", lambda step=batch.step: (stepped.append(len(batch.running)), step())[1])

    streams = {name: stream_tokens(backbone, prompt, lengths[name]) for name, prompt in prompts.items() if name != "late"}
    first = _together(streams, cancel={"cut": 3})
    assert max(stepped) == 4, "the four answers were not decoded in one batch"
    assert batch.running == []  # finished and cancelled answers left the batch
    for name in ("short", "long", "middle"):
        assert first[name] == alone[name], name
    assert first["cut"] == alone["cut"][:3]

    # an answer that joins while others are running (at a step boundary) decodes as it does alone
    streams = {name: stream_tokens(backbone, prompts[name], lengths[name]) for name in ("short", "middle")}
    out = {name: [next(stream)] for name, stream in streams.items()}
    streams["late"] = stream_tokens(backbone, prompts["late"], lengths["late"])
    rest = _together(streams)
    assert {name: out.get(name, []) + rest[name] for name in streams} == {name: alone[name] for name in streams}


def test_a_sampled_answer_decoded_with_others_repeats_its_seed():
    backbone = _with_lora()
    sampled = dict(temperature=1.0, top_p=0.9, seed=3)
    alone = _alone(backbone, PROMPT, 10, **sampled)
    together = _together({"sampled": stream_tokens(backbone, PROMPT, 10, **sampled),
                          "greedy": stream_tokens(backbone, PROMPT[:9], 10)})
    assert together["sampled"] == alone


def test_a_failed_step_fails_the_answers_in_it_and_the_next_answer_decodes(monkeypatch):
    backbone = _with_lora()
    expected = _alone(backbone, PROMPT, 6)
    batch = generation.decode_batch(backbone, "generator")
    streams = [stream_tokens(backbone, PROMPT, 6), stream_tokens(backbone, PROMPT[:12], 6)]
    for stream in streams:
        next(stream)
    monkeypatch.setattr(generation._LeanModel, "rows", lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    for stream in streams:
        with pytest.raises(RuntimeError, match="out of memory"):
            list(stream)
    assert batch.running == []
    monkeypatch.undo()
    assert _alone(backbone, PROMPT, 6) == expected


def test_kv_cache_bytes_counts_every_layer_key_and_value():
    backbone = _with_lora()
    config = backbone.base.config  # 2 layers, 1 KV head of 16 dims, fp32
    assert generation.kv_cache_bytes(backbone, 10) == 2 * 2 * 1 * 16 * 4 * 10 == config.num_hidden_layers * 1280
