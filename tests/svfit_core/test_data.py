"""Training data: format detection, per-line validation (every error kind, with its line number), file
loading, and encoding into tokens and targets (assistant-only masking, completion masking, pairs)."""

from __future__ import annotations

import json

import pytest

from svfit_core.training.collate import collate, epoch_batches, micro_batches
from svfit_core.training.data import detect_format, load_examples, validate_jsonl_line
from svfit_core.training.encoding import IGNORE_INDEX, chat_segments, encode_example
from svfit_core.errors import DataError, SVFitError
from svfit_core.loading import FALLBACK_CHAT_TEMPLATE, ModelLoadError, resolve_model_source
from svfit_core.training.schedule import lr_multiplier
from testkit.tiny_models import build_tokenizer

CHAT = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes good"}]}


def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


USER = {"role": "user", "content": "hi"}


def _chat(*messages) -> bytes:
    return _line({"messages": list(messages)})


# -- format detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "example, fmt",
    [
        (CHAT, "chat"),
        ({"prompt": "a", "completion": "b"}, "completion"),
        ({"text": "a", "label": 1}, "classification"),
        ({"text": "a", "text_pair": "b", "label": 0}, "classification_pair"),
    ],
)
def test_detect_format(example, fmt):
    assert detect_format(example) == fmt


def test_detect_format_unknown_raises_data_error():
    with pytest.raises(DataError) as info:
        detect_format({"question": "a", "answer": "b"})
    assert info.value.code == "invalid_training_file"
    assert isinstance(info.value, SVFitError)


# -- per-line validation -----------------------------------------------------------------------------


def test_valid_line_has_format_and_no_errors():
    assert validate_jsonl_line(_line(CHAT), 1) == ("chat", [])
    assert validate_jsonl_line(_line({"text": "a", "text_pair": "b", "label": 2}), 1) == ("classification_pair", [])


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"{not json}\n", "invalid JSON"),
        (b'{"text": "caf\xe9", "label": 0}\n', "not valid UTF-8"),
        (b"\n", "blank line"),
        (b"   \r\n", "blank line"),
        (_line([1, 2]), "must be a JSON object"),
        (_line({"question": "q"}), "unknown format"),
        (_line({"messages": []}), "'messages' is empty"),
        (_line({"messages": "hi"}), "'messages' must be a list"),
        (_chat(USER, {"role": "assistant", "content": "x", "weight": 0}), "no trainable assistant turn"),
        (_chat({"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}), "unknown role"),
        (_chat({"role": "user", "content": 3}, {"role": "assistant", "content": "x"}), "must be a string"),
        (_chat(USER, {"role": "assistant", "content": "x", "weight": 2}), "'weight' must be 0 or 1"),
        (_chat(USER, {"role": "assistant"}), "has no 'content'"),
        (_line({"prompt": "p", "completion": ""}), "'completion' is empty"),
        (_line({"prompt": 1, "completion": "c"}), "'prompt' must be a string"),
        (_line({"text": "a"}), "missing 'label'"),
        (_line({"text": "a", "label": "positive"}), "must be an integer"),
        (_line({"text": "a", "label": 1.5}), "must be an integer"),
        (_line({"text": "a", "label": True}), "must be an integer"),
        (_line({"text": "a", "label": -1}), "must be ≥ 0"),
        (_line({"text": "a", "text_pair": None, "label": 0}), "'text_pair' must be a string"),
    ],
)
def test_each_error_kind_is_reported_with_its_line_number(line, expected):
    _, errors = validate_jsonl_line(line, 7)
    assert errors, f"no error for {line!r}"
    assert all(e.startswith("line 7: ") for e in errors)
    assert any(expected in e for e in errors), errors


def test_bom_on_first_line_is_accepted():
    assert validate_jsonl_line(b"\xef\xbb\xbf" + _line(CHAT), 1) == ("chat", [])


# -- loading files -------------------------------------------------------------------------------------


def test_load_examples_reads_a_good_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_line(CHAT) + _line(CHAT))
    assert load_examples(path) == [CHAT, CHAT]


def test_load_examples_lists_every_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_line(CHAT) + b"oops\n" + _line(CHAT) + _line({"messages": []}))
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert [e.split(":")[0] for e in info.value.errors] == ["line 2", "line 4"]
    assert "line 2" in str(info.value) and info.value.code == "invalid_training_file"


def test_load_examples_rejects_mixed_formats(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_line(CHAT) + _line({"prompt": "a", "completion": "b"}))
    with pytest.raises(DataError, match="one format"):
        load_examples(path)


def test_load_examples_rejects_an_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="no example"):
        load_examples(path)


# -- encoding --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_tokenizer():
    return build_tokenizer("llama")


def _trained_tokens(tokenizer, encoded) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(t) for t in encoded.labels if t != IGNORE_INDEX]


def test_chat_loss_only_on_assistant_tokens_and_weight_zero_is_masked(llama_tokenizer):
    example = {"messages": [
        {"role": "system", "content": "you are good"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes good", "weight": 0},
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "the movie"},
    ]}
    encoded = encode_example(example, "chat", llama_tokenizer, 512)
    assert len(encoded.labels) == len(encoded.input_ids)
    # Only the last answer and its end-of-turn token train; the weight-0 answer and the prompts do not.
    assert _trained_tokens(llama_tokenizer, encoded) == ["the", "movie", "</s>"]
    trained = [i for i, t in enumerate(encoded.labels) if t != IGNORE_INDEX]
    assert all(encoded.labels[i] == encoded.input_ids[i] for i in trained)
    assert trained == list(range(len(encoded) - 3, len(encoded)))
    # The pieces join to exactly what the template renders for inference.
    text = "".join(piece for piece, _ in chat_segments(example["messages"], llama_tokenizer))
    assert text == llama_tokenizer.apply_chat_template(example["messages"], tokenize=False)


def test_offsets_and_piecewise_tokenisation_agree(llama_tokenizer):
    from svfit_core.training.encoding import encode_chat

    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes good"},
                {"role": "user", "content": "why"}, {"role": "assistant", "content": "the movie"}]
    by_offsets = encode_chat(messages, llama_tokenizer, 512, by_offsets=True)
    by_pieces = encode_chat(messages, llama_tokenizer, 512, by_offsets=False)
    assert by_offsets.input_ids == by_pieces.input_ids and by_offsets.labels == by_pieces.labels


def test_chat_with_fallback_template_masks_each_answer():
    tokenizer = build_tokenizer("gpt2")  # ships no chat template
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    example = {"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "why"}, {"role": "assistant", "content": "no"},
    ]}
    encoded = encode_example(example, "chat", tokenizer, 512)
    assert _trained_tokens(tokenizer, encoded) == ["yes", "</s>", "no", "</s>"]


def test_chat_template_that_adds_a_default_system_prompt(llama_tokenizer):
    # SmolLM-style: a system turn is inserted only when the chat does not open with one, so rendering
    # "nothing + generation prompt" is not a prefix of the full chat; the content-search path handles it.
    tokenizer = build_tokenizer("llama")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<s> system : hello </s> {% endif %}"
        "<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}"
    )
    example = {"messages": [{"role": "assistant", "content": "hello world"}, {"role": "user", "content": "why"}]}
    encoded = encode_example(example, "chat", tokenizer, 512)
    assert _trained_tokens(tokenizer, encoded) == ["hello", "world", "</s>"]


def test_completion_trains_only_the_completion_and_eos(llama_tokenizer):
    encoded = encode_example({"prompt": "hello what", "completion": "the movie"}, "completion", llama_tokenizer, 512)
    assert llama_tokenizer.convert_ids_to_tokens(encoded.input_ids) == ["<s>", "hello", "what", "the", "movie", "</s>"]
    assert _trained_tokens(llama_tokenizer, encoded) == ["the", "movie", "</s>"]


def test_truncation_is_flagged(llama_tokenizer):
    encoded = encode_example({"prompt": "hello what", "completion": "the movie is good"}, "completion",
                             llama_tokenizer, 4)
    assert encoded.truncated and len(encoded.input_ids) == 4 and len(encoded.labels) == 4


def test_classification_pair_encodes_both_texts_with_segments():
    tokenizer = build_tokenizer("bert")
    example = {"text": "good movie", "text_pair": "bad food", "label": 1}
    encoded = encode_example(example, "classification_pair", tokenizer, 512, token_types=True)
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids) == ["<s>", "good", "movie", "</s>", "bad", "food", "</s>"]
    assert encoded.labels == 1
    assert encoded.token_type_ids is not None and len(encoded.token_type_ids) == len(encoded.input_ids)
    truncated = encode_example(example, "classification_pair", tokenizer, 5)
    assert truncated.truncated and len(truncated.input_ids) == 5 and truncated.token_type_ids is None


# -- batching and schedule -------------------------------------------------------------------------------


def test_collate_pads_right_and_masks_padding(llama_tokenizer):
    rows = [encode_example({"prompt": "hello", "completion": w}, "completion", llama_tokenizer, 512)
            for w in ("yes", "the good movie")]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].shape == (2, len(rows[1]))
    assert batch["attention_mask"][0].tolist() == [1] * len(rows[0]) + [0] * (len(rows[1]) - len(rows[0]))
    assert (batch["labels"][0, len(rows[0]):] == IGNORE_INDEX).all()


def test_epoch_order_is_reproducible_and_differs_between_epochs():
    assert epoch_batches(10, 4, shuffle_seed=3, epoch=1) == epoch_batches(10, 4, shuffle_seed=3, epoch=1)
    assert epoch_batches(10, 4, 3, 0) != epoch_batches(10, 4, 3, 1)
    assert sorted(i for b in epoch_batches(10, 4, 3, 0) for i in b) == list(range(10))
    assert [len(b) for b in epoch_batches(10, 4, 3, 0)] == [4, 4, 2]


def test_micro_batches_cover_the_batch(llama_tokenizer):
    rows = [encode_example({"prompt": "hello", "completion": "yes " * n}, "completion", llama_tokenizer, 512)
            for n in range(1, 6)]
    parts = micro_batches([4, 0, 2, 1, 3], rows, 2, max_tokens=10_000)
    assert len(parts) == 2 and sorted(i for p in parts for i in p) == [0, 1, 2, 3, 4]
    assert micro_batches([1], rows, 4, max_tokens=10_000) == [[1]]


def test_schedule_warms_up_then_decays():
    values = [lr_multiplier(s, 10, 2, "linear") for s in range(10)]
    assert values[:3] == [0.5, 1.0, 1.0] and values[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))
    assert lr_multiplier(2, 10, 2, "cosine") == 1.0 and lr_multiplier(9, 10, 2, "cosine") < 0.05


# -- model source resolution -----------------------------------------------------------------------------


def test_resolve_model_source(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_source(hf) == (hf, None)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model.Q4.gguf").write_bytes(b"")
    assert resolve_model_source(gguf) == (gguf, "model.Q4.gguf")
    assert resolve_model_source(gguf / "model.Q4.gguf") == (gguf, "model.Q4.gguf")
    (gguf / "other.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="several"):
        resolve_model_source(gguf)
    with pytest.raises(ModelLoadError):
        resolve_model_source(tmp_path / "missing")
