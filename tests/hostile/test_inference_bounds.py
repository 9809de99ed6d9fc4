"""The inference endpoints with every parameter at and beyond its bounds: 4xx in the error envelope naming
the field, on a real (tiny) model so that the checks that need one (context length, token ids, the
model's task) run too.

Served: `tiny-llama` (a random Llama with a 64-token context) as a base model, and tiny BERT
classification fine-tunes owned by organization alpha: one whose training_meta.json predates the record of
its input kind (it takes texts and text pairs), one trained on pairs and one trained on single texts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tests.api.conftest import Api, _build_api
from tests.hostile.conftest import assert_envelope
from tests.hostile.served_models import CONTEXT, LLAMA, build_models, publish_classifier
from tests.hostile.raw_json import Raw, body_text


@dataclass
class Served:
    api: Api
    classifier: str  # alpha's classification fine-tune (no input kind recorded)
    pair_classifier: str  # one recorded as trained on text pairs
    single_classifier: str  # one recorded as trained on single texts


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite_template) -> Iterator[Served]:  # noqa: ANN001
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: more threads only contend
    root = tmp_path_factory.mktemp("inference-bounds")
    models = build_models(root)
    shutil.copyfile(migrated_sqlite_template, root / "svfit.db")
    api = _build_api(root, f"sqlite:///{root / 'svfit.db'}", models_dir=models, inference_batch_window_ms=0,
                     serving=True)
    classifier = publish_classifier(api.app, api.org_ids["alpha"], models)
    pairs = publish_classifier(api.app, api.org_ids["alpha"], models, "pairclf", text_pair=True)
    single = publish_classifier(api.app, api.org_ids["alpha"], models, "singleclf", text_pair=False)
    with api.client:
        yield Served(api, classifier, pairs, single)
    api.close()
    torch.set_num_threads(threads)


def post(api: Api, path: str, body: dict[str, Any], org: str = "alpha") -> Any:
    return api.client.post(
        f"/v1{path}", content=body_text(body), headers={**api.headers(org), "Content-Type": "application/json"}
    )


COMPLETION = {"model": LLAMA, "prompt": "hello world", "max_tokens": 2}
CHAT = {"model": LLAMA, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
MISSING = object()

# (case id, path, base body, overrides (MISSING deletes a key), status, param)
CASES: list[tuple[str, str, dict, dict, int, str]] = [
    ("max_tokens_zero", "/completions", COMPLETION, {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens_negative", "/completions", COMPLETION, {"max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens_fraction", "/completions", COMPLETION, {"max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens_string", "/completions", COMPLETION, {"max_tokens": "many"}, 400, "max_tokens"),
    ("max_tokens_context", "/completions", COMPLETION, {"max_tokens": CONTEXT}, 400, "max_tokens"),
    ("max_tokens_huge", "/completions", COMPLETION, {"max_tokens": 10**30}, 400, "max_tokens"),
    ("max_tokens_400_digits", "/completions", COMPLETION, {"max_tokens": Raw("9" * 400)}, 400, "max_tokens"),
    ("n_zero", "/completions", COMPLETION, {"n": 0}, 400, "n"),
    ("n_negative", "/completions", COMPLETION, {"n": -3}, 400, "n"),
    ("n_above_max", "/completions", COMPLETION, {"n": 17}, 400, "n"),
    ("n_huge", "/completions", COMPLETION, {"n": 10**30}, 400, "n"),
    ("temperature_negative", "/completions", COMPLETION, {"temperature": -0.1}, 400, "temperature"),
    ("temperature_tiny_negative", "/completions", COMPLETION, {"temperature": -1e-12}, 400, "temperature"),
    ("temperature_above_2", "/completions", COMPLETION, {"temperature": 2.01}, 400, "temperature"),
    ("temperature_nan", "/completions", COMPLETION, {"temperature": float("nan")}, 400, "temperature"),
    ("temperature_infinity", "/completions", COMPLETION, {"temperature": float("inf")}, 400, "temperature"),
    ("temperature_minus_infinity", "/completions", COMPLETION, {"temperature": float("-inf")}, 400, "temperature"),
    ("temperature_string", "/completions", COMPLETION, {"temperature": "hot"}, 400, "temperature"),
    ("top_p_zero", "/completions", COMPLETION, {"top_p": 0}, 400, "top_p"),
    ("top_p_above_one", "/completions", COMPLETION, {"top_p": 1.01}, 400, "top_p"),
    ("top_p_nan", "/completions", COMPLETION, {"top_p": float("nan")}, 400, "top_p"),
    ("stop_number", "/completions", COMPLETION, {"stop": 5}, 400, "stop"),
    ("stop_list_of_numbers", "/completions", COMPLETION, {"stop": [1]}, 400, "stop"),
    ("stop_too_many", "/completions", COMPLETION, {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("seed_string", "/completions", COMPLETION, {"seed": "lucky"}, 400, "seed"),
    ("stream_options_string", "/completions", COMPLETION, {"stream_options": "yes"}, 400, "stream_options"),
    ("prompt_missing", "/completions", COMPLETION, {"prompt": MISSING}, 400, "prompt"),
    ("prompt_empty_list", "/completions", COMPLETION, {"prompt": []}, 400, "prompt"),
    ("prompt_empty_tokens", "/completions", COMPLETION, {"prompt": [[]]}, 400, "prompt"),
    ("prompt_negative_token", "/completions", COMPLETION, {"prompt": [-1]}, 400, "prompt"),
    ("prompt_token_beyond_vocab", "/completions", COMPLETION, {"prompt": [10**9]}, 400, "prompt"),
    ("prompt_object", "/completions", COMPLETION, {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("prompt_beyond_context", "/completions", COMPLETION, {"prompt": "hello " * 200}, 400, "prompt"),
    ("model_missing", "/completions", COMPLETION, {"model": MISSING}, 400, "model"),
    ("model_unknown", "/completions", COMPLETION, {"model": "no-such-model"}, 404, "model"),
    ("model_empty", "/completions", COMPLETION, {"model": ""}, 404, "model"),
    ("model_traversal", "/completions", COMPLETION, {"model": "../../../etc/passwd"}, 404, "model"),
    ("model_is_a_classifier", "/completions", COMPLETION, {"model": "CLASSIFIER"}, 400, "model"),
    ("chat_messages_empty", "/chat/completions", CHAT, {"messages": []}, 400, "messages"),
    ("chat_messages_missing", "/chat/completions", CHAT, {"messages": MISSING}, 400, "messages"),
    ("chat_messages_string", "/chat/completions", CHAT, {"messages": "hello"}, 400, "messages"),
    ("chat_role_missing", "/chat/completions", CHAT, {"messages": [{"content": "x"}]}, 400, "messages.0.role"),
    ("chat_role_number", "/chat/completions", CHAT, {"messages": [{"role": 5, "content": "x"}]}, 400,
     "messages.0.role"),
    ("chat_content_number", "/chat/completions", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content"),
    ("chat_max_tokens_huge", "/chat/completions", CHAT, {"max_tokens": 10**12}, 400, "max_tokens"),
    ("chat_max_completion_tokens_zero", "/chat/completions", CHAT, {"max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("chat_max_completion_tokens_context", "/chat/completions", CHAT, {"max_completion_tokens": CONTEXT}, 400,
     "max_completion_tokens"),
    ("presence_penalty_above_2", "/completions", COMPLETION, {"presence_penalty": 2.01}, 400, "presence_penalty"),
    ("frequency_penalty_nan", "/completions", COMPLETION, {"frequency_penalty": float("nan")}, 400,
     "frequency_penalty"),
    ("chat_frequency_penalty_string", "/chat/completions", CHAT, {"frequency_penalty": "lots"}, 400,
     "frequency_penalty"),
    ("chat_n_huge", "/chat/completions", CHAT, {"n": 10**9}, 400, "n"),
    ("chat_temperature_negative", "/chat/completions", CHAT, {"temperature": -1}, 400, "temperature"),
    ("chat_top_p_negative", "/chat/completions", CHAT, {"top_p": -1}, 400, "top_p"),
    ("classify_input_missing", "/classifications", {"model": "CLASSIFIER"}, {}, 400, "input"),
    ("classify_input_empty", "/classifications", {"model": "CLASSIFIER"}, {"input": []}, 400, "input"),
    ("classify_input_numbers", "/classifications", {"model": "CLASSIFIER"}, {"input": [1, 2]}, 400, "input"),
    ("classify_input_object", "/classifications", {"model": "CLASSIFIER"}, {"input": {"a": "b"}}, 400, "input"),
    ("classify_model_unknown", "/classifications", {"model": "nope", "input": "x"}, {}, 404, "model"),
    ("classify_language_model", "/classifications", {"model": LLAMA, "input": "x"}, {}, 400, "model"),
    ("classify_too_many_texts", "/classifications", {"model": "CLASSIFIER"}, {"input": ["x"] * 2049}, 400, "input"),
    ("classify_list_of_lists", "/classifications", {"model": "CLASSIFIER"}, {"input": [["a", "b"]]}, 400, "input"),
    *[(f"classify_pair_{name}", "/classifications", {"model": "CLASSIFIER"}, {"input": value}, 400, "input")
      for name, value in [
          ("missing_text_pair", {"text": "a"}),
          ("missing_text", [{"text_pair": "b"}]),
          ("unknown_key", {"text": "a", "text_pair": "b", "label": 1}),
          ("text_number", {"text": 5, "text_pair": "b"}),
          ("text_pair_null", [{"text": "a", "text_pair": None}]),
          ("text_object", {"text": {"text": "a"}, "text_pair": "b"}),
          ("text_pair_list", {"text": "a", "text_pair": ["b"]}),
          ("mixed_with_strings", ["a", {"text": "a", "text_pair": "b"}]),
          ("empty_object", {}),
          ("too_many", [{"text": "x", "text_pair": "y"}] * 2049),
      ]],
    ("classify_string_to_pair_model", "/classifications", {"model": "PAIR_CLASSIFIER"}, {"input": "x"}, 400, "input"),
    ("classify_strings_to_pair_model", "/classifications", {"model": "PAIR_CLASSIFIER"}, {"input": ["x", "y"]}, 400,
     "input"),
    ("classify_pair_to_single_text_model", "/classifications", {"model": "SINGLE_CLASSIFIER"},
     {"input": {"text": "a", "text_pair": "b"}}, 400, "input"),
]


def _body(served: Served, base: dict, overrides: dict) -> dict:
    body = {**base, **overrides}
    for key in [k for k, v in body.items() if v is MISSING]:
        del body[key]
    named = {"CLASSIFIER": served.classifier, "PAIR_CLASSIFIER": served.pair_classifier,
             "SINGLE_CLASSIFIER": served.single_classifier}
    body["model"] = named.get(body.get("model"), body.get("model"))
    return body


@pytest.mark.parametrize(
    ("path", "base", "overrides", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_out_of_bounds_inference_parameters_name_the_field(served: Served, path, base, overrides, status, param):  # noqa: ANN001
    error = assert_envelope(post(served.api, path, _body(served, base, overrides)), status, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "base", "overrides"),
    [
        ("/completions", COMPLETION, {"temperature": 0}),
        ("/completions", COMPLETION, {"temperature": 2, "seed": 10**30}),
        ("/completions", COMPLETION, {"temperature": 5e-324, "top_p": 5e-324, "n": 2}),  # found by fuzzing
        ("/chat/completions", CHAT, {"temperature": 1e-300, "ignore_eos": True}),
        ("/completions", COMPLETION, {"top_p": 1, "n": 16, "stop": ["a", "b", "c", "d"]}),
        ("/completions", COMPLETION, {"max_tokens": 1, "prompt": [5, 6, 7]}),
        ("/completions", COMPLETION, {"max_tokens": CONTEXT - 3, "prompt": "hello world"}),
        ("/chat/completions", CHAT, {"max_completion_tokens": 1, "unknown_key": {"x": 1}}),
        ("/classifications", {"model": "CLASSIFIER"}, {"input": ["good movie", ""]}),
        ("/classifications", {"model": "CLASSIFIER"}, {"input": [{"text": "", "text_pair": ""}]}),
        ("/classifications", {"model": "PAIR_CLASSIFIER"}, {"input": {"text": "good", "text_pair": "the " * 100}}),
        ("/classifications", {"model": "SINGLE_CLASSIFIER"}, {"input": ["good movie"]}),
    ],
    ids=["temperature_0", "temperature_2_huge_seed", "temperature_denormal", "chat_temperature_tiny",
         "top_p_1_n_16_four_stops", "max_tokens_1_token_ids", "max_tokens_fills_context", "max_completion_tokens_1",
         "classify_empty_string", "classify_empty_pair", "classify_pair_longer_than_the_context",
         "classify_single_text_model"],
)
def test_values_at_the_bounds_are_served(served: Served, path, base, overrides):  # noqa: ANN001
    response = post(served.api, path, _body(served, base, overrides))
    assert response.status_code == 200, response.text


def test_a_classifier_sent_the_other_input_kind_says_which_it_takes(served: Served):
    to_pairs = post(served.api, "/classifications", {"model": served.pair_classifier, "input": ["good", "bad"]})
    assert "trained on text pairs" in assert_envelope(to_pairs, 400, "invalid_input_kind", "input")["message"]
    pair = {"text": "good", "text_pair": "bad"}
    to_single = post(served.api, "/classifications", {"model": served.single_classifier, "input": [pair]})
    assert "trained on single texts" in assert_envelope(to_single, 400, "invalid_input_kind", "input")["message"]
    # A malformed input is a malformed input, whatever the model: not a question of kind.
    mixed = post(served.api, "/classifications", {"model": served.pair_classifier, "input": [pair, "good"]})
    assert_envelope(mixed, 400, "invalid_parameter", "input")


def test_another_organizations_fine_tune_is_unknown(served: Served):
    """beta names alpha's classifier: the same 404 as a model that does not exist."""
    response = post(served.api, "/classifications", {"model": served.classifier, "input": "x"}, org="beta")
    error = assert_envelope(response, 404, "model_not_found", "model")
    assert "does not exist" in error["message"]
