"""Continual pre-training's packing: which token ends each passage, and full sequences."""

import pytest
from tiny import tiny_tokenizer

from bsharedrag.model.prompt import document_end_id, turn_end_id
from bsharedrag.train.pretrain import pack


def test_documents_end_with_eos_or_with_end_of_text_where_eos_ends_a_turn():
    tokenizer = tiny_tokenizer()  # SmolLM2-Instruct: EOS is <|im_end|>, the chat end of turn
    assert tokenizer.eos_token_id == turn_end_id(tokenizer)
    assert document_end_id(tokenizer) == tokenizer.eos_token_id
    end = document_end_id(tokenizer, "end_of_text")
    assert tokenizer.convert_ids_to_tokens(end) == "<|endoftext|>" and end != tokenizer.eos_token_id


def test_a_tokenizer_whose_eos_is_not_a_turn_end_keeps_eos():
    tokenizer = tiny_tokenizer(chat_template=False)  # no chat template: EOS ends no turn
    assert document_end_id(tokenizer, "end_of_text") == tokenizer.eos_token_id


@pytest.mark.parametrize("setting", ["end_of_text", "eos"])
def test_pack_ends_every_passage_with_the_chosen_token_and_cuts_full_sequences(setting):
    tokenizer = tiny_tokenizer()
    end = document_end_id(tokenizer, setting)
    texts = ["Yes.", "It fits the 2012 model.", "Hand wash only."]
    sequences = pack(tokenizer, texts * 4, seq_len=8, end_id=end)
    stream = [token for text in texts * 4 for token in tokenizer(text, add_special_tokens=False)["input_ids"] + [end]]
    assert all(len(sequence) == 8 for sequence in sequences)
    assert [token for sequence in sequences for token in sequence] == stream[: 8 * len(sequences)]
    other = tokenizer.eos_token_id if setting == "end_of_text" else document_end_id(tokenizer, "end_of_text")
    assert other not in stream
