import pytest
import torch

from bsharedrag.config import LoraSettings
from tiny import tiny_backbone


def test_switching_adapters_changes_outputs_and_none_is_the_base_model():
    backbone = tiny_backbone()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = backbone.model(input_ids=ids).logits
        for name in ("retriever", "generator"):
            backbone.add_adapter(name, LoraSettings(r=4))
            for n, p in backbone.model.named_parameters():
                if f"lora_B.{name}" in n:
                    p.normal_(0, 0.5)
        outputs = {}
        for name in ("retriever", "generator", None):
            backbone.use(name)
            outputs[name] = backbone.model(input_ids=ids).logits
    assert torch.allclose(outputs[None], base)
    assert not torch.allclose(outputs["retriever"], base)
    assert not torch.allclose(outputs["retriever"], outputs["generator"])
    with backbone.adapter("generator"):
        assert backbone.active_adapter == "generator"
    assert backbone.active_adapter is None
    with pytest.raises(KeyError, match="known adapters"):
        backbone.use("default")


def _two_random_adapters():
    backbone = tiny_backbone()
    for name in ("retriever", "generator"):
        backbone.add_adapter(name, LoraSettings(r=4))
    with torch.no_grad():
        for n, p in backbone.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return backbone


def test_the_fast_switch_gives_what_peft_s_own_switch_gives():
    backbone = _two_random_adapters()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    trainable = [p.requires_grad for p in backbone.model.parameters()]
    with torch.no_grad():
        for name in ("retriever", "generator", None, "generator"):
            backbone.use(name)
            fast = backbone.model(input_ids=ids).logits
            backbone._peft_switch(name)
            assert torch.equal(backbone.model(input_ids=ids).logits, fast), name
    assert [p.requires_grad for p in backbone.model.parameters()] == trainable  # neither switch changes what trains


def test_merged_layers_fall_back_to_peft_s_switch():
    backbone = _two_random_adapters()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        backbone.use("retriever")
        adapted = backbone.model(input_ids=ids).logits
        backbone.model.base_model.merge_adapter(["retriever"])  # the weights now hold the retriever's update
        backbone.use("retriever")
        assert torch.allclose(backbone.model(input_ids=ids).logits, adapted, atol=1e-4)
        backbone.use(None)  # peft unmerges: the bare model again, not the merged weights
        assert not torch.allclose(backbone.model(input_ids=ids).logits, adapted, atol=1e-4)


def test_merge_and_unload_folds_the_adapter_into_the_weights():
    backbone = _two_random_adapters()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    backbone.remove_adapter("generator")
    with torch.no_grad():
        backbone.use("retriever")
        adapted = backbone.model(input_ids=ids).logits
        backbone.merge_and_unload()
        assert backbone.adapters == [] and backbone.active_adapter is None
        assert torch.allclose(backbone.model(input_ids=ids).logits, adapted, atol=1e-4)


def test_the_library_internals_that_the_fast_paths_read_are_there():
    """`SharedBackbone.use` and the lean decoder (model/generate.py) read private state of peft's LoRA layers and
    transformers' Llama modules; pyproject.toml bounds both libraries, and this says what an upgrade broke."""
    import peft
    import transformers

    backbone = _two_random_adapters()
    layer = backbone._lora_layers[0]
    needed = {"_active_adapter", "_disable_adapters"} - set(vars(layer))
    needed |= {name for name in ("lora_A", "lora_B", "scaling", "base_layer", "merged") if not hasattr(layer, name)}
    assert not needed, (f"peft {peft.__version__} changed the LoRA layer state that SharedBackbone.use and "
                        f"model/generate.py read (missing: {sorted(needed)}): keep peft below this version in "
                        "pyproject.toml, or update those two modules")
    decoder_layer = backbone.base.model.layers[0]
    missing = [name for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
               if not hasattr(decoder_layer, name)]
    missing += [name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(decoder_layer.self_attn, name)]
    missing += [name for name in ("rotary_emb", "norm", "embed_tokens") if not hasattr(backbone.base.model, name)]
    assert not missing, (f"transformers {transformers.__version__} changed the Llama modules that the lean decoder "
                         f"(model/generate.py) reads (missing: {missing}): keep transformers below this version in "
                         "pyproject.toml, or update model/generate.py")


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        backbone = tiny_backbone()
        backbone.gradient_checkpointing = checkpointing
        torch.manual_seed(0)
        with backbone.training("a", LoraSettings(r=4)) as named:
            ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
            assert backbone.base.is_gradient_checkpointing == checkpointing
            backbone.model(input_ids=ids, labels=ids).loss.backward()
            grads.append({name: p.grad.clone() for name, p in named.items()})
        assert not backbone.base.is_gradient_checkpointing  # off again after the block
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])
