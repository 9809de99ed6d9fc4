"""How log probabilities name tokens: a byte-level BPE token reports its exact UTF-8 bytes, even when it
holds part of a character; other tokenizers report the token's decoded text."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from serving.logprobs import TokenNames
from testkit.tiny_models import build_tokenizer


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"])
    tokenizer.train_from_iterator(["héllo wörld naïve café 😀"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>")


def test_byte_level_tokens_carry_their_exact_bytes():
    tokenizer = byte_level_tokenizer()
    names = TokenNames(tokenizer)
    assert names.byte_level
    text = "naïve € café 😀 wörld"  # "€" never occurs in training: it stays three single-byte tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    named = [names(i) for i in ids]
    assert b"".join(bytes(raw) for _, raw in named) == text.encode("utf-8")
    partial = [token for token, raw in named if "\ufffd" in token]
    assert len(partial) >= 3, "the euro sign's bytes are tokens of their own, each shown as U+FFFD"
    whole = [(token, raw) for token, raw in named if "\ufffd" not in token]
    assert all(bytes(raw).decode("utf-8") == token for token, raw in whole)


def test_other_tokenizers_name_tokens_by_their_text():
    tokenizer = build_tokenizer("llama")
    names = TokenNames(tokenizer)
    assert not names.byte_level
    for token_id in tokenizer("the movie was good", add_special_tokens=False)["input_ids"]:
        token, raw = names(token_id)
        assert token == tokenizer.decode([token_id]) and bytes(raw) == token.encode("utf-8")
