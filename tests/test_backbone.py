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
