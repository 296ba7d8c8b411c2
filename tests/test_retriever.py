import math

import pytest
import torch

from bsharedrag.config import RetrieverConfig
from bsharedrag.model.encoder import Encoder, last_token_pool
from bsharedrag.train.retriever import info_nce
from tiny import tiny_backbone


def test_last_token_pool_picks_last_real_token_under_both_paddings():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).reshape(2, 4, 1)  # (batch, seq, dim)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_embeddings_equal_under_left_and_right_padding():
    backbone = tiny_backbone()
    encoder = Encoder(backbone, RetrieverConfig(), adapter=None)
    batch = encoder.tokenize(["query: a short one", "query: a somewhat longer question about kettles"], 32)
    right = encoder.forward(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    left_ids, left_mask = torch.full_like(ids, backbone.tokenizer.pad_token_id), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], 1
    positions = (left_mask.cumsum(1) - 1).clamp(min=0)
    with backbone.autocast_context():
        hidden = backbone.decoder(input_ids=left_ids, attention_mask=left_mask, position_ids=positions).last_hidden_state
    left = torch.nn.functional.normalize(last_token_pool(hidden, left_mask), dim=-1)
    assert torch.allclose(left, right, atol=1e-4)
    assert torch.allclose(right.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_tokenize_appends_the_document_end_after_truncation():
    backbone = tiny_backbone()
    encoder = Encoder(backbone, RetrieverConfig(), adapter=None)
    batch = encoder.tokenize(["passage: " + "word " * 100], 16)
    assert batch["input_ids"].shape[1] == 16
    assert batch["input_ids"][0, -1].item() == backbone.tokenizer.eos_token_id
    end = backbone.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    other = Encoder(backbone, RetrieverConfig(), adapter=None, end_id=end)
    assert other.tokenize(["passage: a kettle"], 16)["input_ids"][0, -1].item() == end


def test_info_nce_equals_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    t = 0.5
    # query 0: scores (2, 1.2, 0), target 0; query 1: scores (0, 1.6, 2), target 2
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2) + math.exp(0)))
    l1 = -math.log(math.exp(2) / (math.exp(0) + math.exp(1.6) + math.exp(2)))
    loss = info_nce(q, p, torch.tensor([0, 2]), t)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_info_nce_mask_removes_known_positives_from_negatives():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    masked = info_nce(q, p, torch.tensor([0]), 1.0, mask=torch.tensor([[False, True, False]]))
    expected = -math.log(math.e / (math.e + 1))
    assert masked.item() == pytest.approx(expected, rel=1e-6)


def test_grad_cache_gives_the_same_gradients_as_one_pass():
    import random

    from bsharedrag.data import Document
    from bsharedrag.train.retriever import TrainingExample, contrastive_step

    docs = [Document(f"d{i}", f"Product {i}", f"fact {i} " * (i + 1)) for i in range(8)]
    batch = [TrainingExample(f"question {i}", (docs[i],), (docs[(i + 1) % 8],)) for i in range(4)]
    grads = []
    for micro in (None, 2):
        backbone = tiny_backbone()
        settings = RetrieverConfig(batch_size=4, micro_batch_size=micro, negatives_per_query=1)
        backbone.add_adapter("retriever", settings.lora)
        params = backbone.train_adapter("retriever")
        with torch.no_grad():
            for param in params:  # LoRA B starts at zero; give it weights so every gradient is non-trivial
                param.normal_(0, 0.05)
        contrastive_step(Encoder(backbone, settings), batch, settings, random.Random(0))
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)


def test_the_training_attention_kernel_applies_to_the_step_only_and_gives_the_same_gradients():
    import random

    from bsharedrag.data import Document
    from bsharedrag.train.retriever import TrainingExample, contrastive_step, training_attention

    docs = [Document(f"d{i}", f"Product {i}", f"fact {i} " * (i + 1)) for i in range(6)]
    batch = [TrainingExample(f"question {i}", (docs[i],), (docs[(i + 1) % 6],)) for i in range(3)]
    grads = []
    for kernel in ("eager", "sdpa"):
        backbone = tiny_backbone()
        own = backbone.base.config._attn_implementation
        settings = RetrieverConfig(batch_size=3, negatives_per_query=1, training_attention=kernel)
        backbone.add_adapter("retriever", settings.lora)
        params = backbone.train_adapter("retriever")
        with torch.no_grad():
            for param in params:
                param.normal_(0, 0.05)
        contrastive_step(Encoder(backbone, settings), batch, settings, random.Random(0))
        assert backbone.base.config._attn_implementation == own  # inference keeps the model's kernel
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)
    assert training_attention(RetrieverConfig(), "cpu") == "eager"
    assert training_attention(RetrieverConfig(), "cuda") is None
