"""The inference endpoints over HTTP: response shapes, streaming, model resolution, errors, classification,
embeddings."""

from __future__ import annotations

import base64
import json
import math
import shutil
import struct

import pytest
import torch

from tests.serving.conftest import BERT, CLF, LLAMA, fail_shared_forward, perturbed_svfit_model

CHAT = [{"role": "user", "content": "what is good ?"}]


def chat(served, model: str, **body):
    body = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0, **body}
    return served.post("/chat/completions", body)


def complete(served, model: str, **body):
    body = {"model": model, "prompt": "the movie was", "max_tokens": 8, "temperature": 0, **body}
    return served.post("/completions", body)


def events(response) -> list:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_chat_completion_shape_and_usage(served):
    response = chat(served, served.model_ids["sv0"], n=2, unknown_key={"ignored": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 16


def test_streamed_chat_equals_non_streamed(served):
    model = served.model_ids["sv1"]
    whole = chat(served, model, max_completion_tokens=12, max_tokens=3).json()  # max_completion_tokens wins
    chunks = events(chat(served, model, max_completion_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] <= 12


def test_streamed_completion_equals_non_streamed(served):
    model = served.model_ids["sv2"]
    whole = complete(served, model, ignore_eos=True).json()
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 8
    chunks = events(complete(served, model, ignore_eos=True, stream=True))
    assert "usage" not in chunks[0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_multiple_prompts_each_get_n_choices(served):
    body = complete(served, LLAMA, prompt=["the movie was", "i love this"], n=2, temperature=1, seed=1).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    text_prompt = complete(served, LLAMA, prompt="i love this").json()["choices"][0]["text"]
    ids_prompt = complete(served, LLAMA, prompt=[2, 22, 37, 20]).json()  # <s> i love this, as token ids
    assert ids_prompt["choices"][0]["text"] == text_prompt
    error(complete(served, LLAMA, prompt=["a", [1, 2]]), 400, "prompt")


def test_fine_tune_checkpoint_and_base_answer_differently(served):
    answers = {
        name: complete(served, model, ignore_eos=True, max_tokens=12).json()["choices"][0]["text"]
        for name, model in (("base", LLAMA), ("final", served.model_ids["sv0"]), ("ckpt", served.model_ids["sv0_ckpt"]))
    }
    assert len(set(answers.values())) == 3, answers


def test_merged_model_answers_as_the_adapter(served):
    adapter = complete(served, served.model_ids["sv0"], ignore_eos=True, max_tokens=16).json()
    merged = complete(served, served.model_ids["merged0"], ignore_eos=True, max_tokens=16).json()
    assert merged["choices"][0]["text"] == adapter["choices"][0]["text"]


@pytest.mark.parametrize("name", ["lora0", "full0"])
def test_lora_and_full_fine_tunes_serve(served, name):
    base = complete(served, LLAMA, ignore_eos=True).json()["choices"][0]["text"]
    tuned = complete(served, served.model_ids[name], ignore_eos=True).json()["choices"][0]["text"]
    assert tuned != base


def test_models_list_fine_tunes_and_checkpoints_with_parent(served):
    listed = {m["id"]: m for m in served.client.get("/v1/models", headers=served.headers()).json()["data"]}
    assert {LLAMA, BERT} <= set(listed)
    assert listed[served.model_ids["sv0_ckpt"]]["parent"] == LLAMA
    assert listed[served.model_ids["clf"]]["parent"] == BERT


def error(response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["param"] == param, body
    return body["message"]


def test_unknown_and_foreign_models_are_404_model(served):
    error(chat(served, "ft:tiny-llama:nobody::0"), 404, "model")
    assert chat(served, "ft:tiny-llama:nobody::0").json()["error"]["code"] == "model_not_found"
    foreign = {"model": served.model_ids["sv0"], "messages": CHAT}
    error(served.post("/chat/completions", foreign, org="beta"), 404, "model")
    error(served.post("/classifications", {"model": served.model_ids["clf"], "input": "x"}, org="beta"), 404, "model")


def test_context_overflow_states_both_numbers(served):
    message = error(complete(served, LLAMA, max_tokens=62), 400, "prompt")  # 4 prompt tokens + 62 > 64
    assert "64 tokens" in message and "4 in the prompt" in message and "62 in the completion" in message
    assert complete(served, LLAMA, max_tokens=60).status_code == 200  # 4 + 60 fits exactly
    assert chat(served, LLAMA, max_tokens=60).json()["error"]["code"] == "context_length_exceeded"
    # A limit that can never fit is named by the field it came in.
    error(chat(served, LLAMA, max_completion_tokens=64), 400, "max_completion_tokens")
    error(chat(served, LLAMA, max_tokens=64), 400, "max_tokens")


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 17),
     ("max_tokens", 0), ("max_completion_tokens", 0), ("stop", ["a", "b", "c", "d", "e"]),
     ("presence_penalty", 2.5), ("frequency_penalty", -2.1)],
)
def test_invalid_sampling_values_are_400_naming_the_field(served, field, value):
    error(chat(served, LLAMA, **{field: value}), 400, field)


@pytest.mark.parametrize(
    ("body", "param"),
    [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
     ({"logprobs": True, "top_logprobs": -1}, "top_logprobs")],
)
def test_invalid_chat_logprobs_are_400_naming_the_field(served, body, param):
    error(chat(served, LLAMA, **body), 400, param)


@pytest.mark.parametrize("bias", [{"abc": 1}, {"-3": 1}, {"²": 1}, {"": 1}, {"5": 101}, {"5": -100.5}, {"100000": 1},
                                  {str(i): 1 for i in range(1025)}])
def test_invalid_logit_bias_is_400(served, bias):
    error(chat(served, LLAMA, logit_bias=bias), 400, "logit_bias")
    error(complete(served, LLAMA, logit_bias=bias), 400, "logit_bias")


def test_zero_max_tokens_needs_echo(served):
    error(complete(served, LLAMA, max_tokens=0), 400, "max_tokens")
    error(chat(served, LLAMA, max_tokens=0), 400, "max_tokens")
    echoed = complete(served, LLAMA, max_tokens=0, echo=True)
    assert echoed.status_code == 200 and echoed.json()["choices"][0]["text"] == "the movie was"


@pytest.mark.parametrize("value", [-1, 6])
def test_invalid_completion_logprobs_are_400(served, value):
    error(complete(served, LLAMA, logprobs=value), 400, "logprobs")


def test_model_of_the_wrong_task_is_refused(served):
    error(chat(served, served.model_ids["clf"]), 400, "model")
    error(served.post("/classifications", {"model": served.model_ids["sv0"], "input": "x"}), 400, "model")


@pytest.mark.parametrize("name", [BERT, "clf"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_model_that_generates_no_text_refuses_chat_and_completions(served, name, stream):
    """An encoder base would load as a causal LM with a fresh head (a 200 of random word pieces): refused,
    streamed or not, before any stream starts, pointing at the endpoints that serve it."""
    model = served.model_ids.get(name, name)
    for response in (chat(served, model, stream=stream), complete(served, model, stream=stream)):
        message = error(response, 400, "model")
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == "model_not_generative"
        assert "/v1/embeddings" in message and "/v1/classifications" in message
    assert served.post("/embeddings", {"model": model, "input": "still an encoder"}).status_code == 200


TOOLS_ON_COMPLETIONS = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
]
STRUCTURED_OUTPUTS = [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
]


@pytest.mark.parametrize(("body", "param"), TOOLS_ON_COMPLETIONS)
@pytest.mark.parametrize("stream", [False, True])
def test_tools_on_legacy_completions_are_refused_not_ignored(served, body, param, stream):
    message = error(complete(served, LLAMA, stream=stream, **body), 400, param)
    assert "/v1/chat/completions" in message


@pytest.mark.parametrize(("body", "param"), STRUCTURED_OUTPUTS)
@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_on_legacy_completions_are_refused_not_ignored(served, body, param, stream):
    message = error(complete(served, LLAMA, stream=stream, **body), 400, param)
    assert "/v1/chat/completions" in message


@pytest.mark.parametrize("body", [
    {"tools": []}, {"tools": None}, {"tool_choice": "none"}, {"tool_choice": "auto"}, {"functions": []},
    {"function_call": "none"}, {"response_format": {"type": "text"}}, {"parallel_tool_calls": False},
    {"tools": [], "tool_choice": "none", "parallel_tool_calls": True, "response_format": None},
    # What clients send today, still ignored or honoured as before.
    {"user": "u-1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto", "seed": 3, "n": 1,
     "logprobs": False, "max_completion_tokens": 4, "stream_options": None, "modalities": ["text"]},
])
def test_a_request_that_asks_for_no_tools_is_served(served, body):
    response = chat(served, LLAMA, **body)
    assert response.status_code == 200, response.text
    body.pop("max_completion_tokens", None), body.pop("logprobs", None)  # chat-only fields
    assert complete(served, LLAMA, **body).status_code == 200


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_tool_calls_and_their_results_in_the_conversation_are_served(served):
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert chat(served, LLAMA, messages=messages).status_code == 200
    legacy = [*CHAT, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
              {"role": "function", "name": "f", "content": "42"}]
    assert chat(served, LLAMA, messages=legacy).status_code == 200


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "tool", "content": "42", "tool_call_id": "c9"}, "messages[1].tool_call_id"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
     "messages[1].tool_calls[0]"),
])
def test_a_tool_result_without_its_call_or_a_malformed_call_is_a_400(served, message, param):
    response = chat(served, LLAMA, messages=[*CHAT, message])
    error(response, 400, param)
    assert response.json()["error"]["code"] == "invalid_parameter"


def test_classification_labels_with_probabilities(served):
    response = served.post("/classifications", {"model": served.model_ids["clf"], "input": ["good movie", "bad film"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    for item in body["data"]:
        labels = item["labels"]
        assert {entry["label"] for entry in labels} == {"negative", "positive"}
        assert sum(entry["probability"] for entry in labels) == pytest.approx(1.0, abs=1e-5)
        assert item["label"] == labels[0]["label"] and labels[0]["probability"] >= labels[1]["probability"]
    single = served.post("/classifications", {"model": served.model_ids["clf"], "input": "good movie"}).json()
    alone, batched = single["data"][0]["labels"], body["data"][0]["labels"]
    # Same ranking; probabilities equal up to float rounding (a batch of 2 may take another BLAS kernel).
    assert [e["label"] for e in alone] == [e["label"] for e in batched]
    assert [e["probability"] for e in alone] == pytest.approx([e["probability"] for e in batched], rel=1e-5)


PAIRS = [
    {"text": f"the {noun} is {word}", "text_pair": f"i {verb} it", "label": (i + j) % 2}
    for i, (noun, word) in enumerate([("movie", "good"), ("food", "bad"), ("book", "great"), ("film", "terrible")])
    for j, verb in enumerate(("love", "hate"))
]  # 8 examples, 2 labels


def publish_classifier(served, name: str, folder) -> str:  # noqa: ANN001
    """`folder` (an adapter of tiny-bert) as alpha's fine-tune `name`, with the rows the worker writes."""
    from sqlalchemy import select

    from api.core.tables import FineTunedModel, Job

    app = served.app
    job_id, key = f"ftjob-{name}", f"jobs/ftjob-{name}/final"
    shutil.copytree(folder, app.state.storage.path(key))
    with app.state.sessionmaker() as session:
        org_id = session.scalar(select(FineTunedModel.org_id).where(FineTunedModel.id == served.model_ids["clf"]))
        session.add(Job(id=job_id, org_id=org_id, model=BERT, training_file="file-x", seed=0, hyperparameters={},
                        method={}, peft={}, status="succeeded"))
        session.flush()  # the model row's foreign key needs the job row first
        model = f"ft:{BERT}:org-alpha:{name}:{job_id}"
        session.add(FineTunedModel(id=model, org_id=org_id, parent=BERT, job_id=job_id, storage_key=key))
        session.commit()
    return model


@pytest.fixture(scope="module")
def pair_classifier(served, zoo, tmp_path_factory):  # noqa: ANN001, ANN201
    """A tiny-bert classifier trained on text pairs by the training loop itself: (model id, adapter folder)."""
    from svfit_core.training import PeftSpec, TrainConfig, run_training

    # A tiny random BERT's answer barely depends on its input; a high σ rate makes it depend enough (below).
    config = TrainConfig(n_epochs=4, batch_size=4, seed=0, learning_rate=1.0, label_names=["negative", "positive"])
    result = run_training(zoo.bert, PAIRS, None, PeftSpec(rank=4), config, tmp_path_factory.mktemp("pair-clf"))
    return publish_classifier(served, "pairs", result.adapter_dir), result.adapter_dir


def test_a_pair_classifier_serves_the_logits_it_gives_its_training_encoding(served, zoo, pair_classifier):
    from svfit_core.training.encoding import encode_classification
    from svfit_core.training.outputs import load_trained_model

    model_id, adapter = pair_classifier
    pairs = [{"text": "the movie is good", "text_pair": "i hate it"},
             {"text": "i hate it", "text_pair": "the movie is good"},
             {"text": "a much longer first text than the second one", "text_pair": "short"}]
    response = served.post("/classifications", {"model": model_id, "input": pairs})
    assert response.status_code == 200, response.text
    served_logprobs = torch.tensor([
        [math.log({e["label"]: e["probability"] for e in item["labels"]}[label]) for label in ("negative", "positive")]
        for item in response.json()["data"]
    ])
    model, tokenizer, meta = load_trained_model(zoo.bert, adapter)
    assert meta["text_pair"] is True  # what training recorded, and what the refusal below rests on
    token_types = bool(model.config.type_vocab_size)
    own = []
    with torch.no_grad():
        for pair in pairs:  # one row at a time: no padding, exactly a training row of that pair
            row = encode_classification(pair["text"], pair["text_pair"], 0, tokenizer, 64, token_types=token_types)
            inputs = {"input_ids": torch.tensor([row.input_ids]), "token_type_ids": torch.tensor([row.token_type_ids])}
            own.append(torch.log_softmax(model(**inputs).logits[0].float(), dim=-1))
        alone = torch.log_softmax(model(**tokenizer(pairs[0]["text"], return_tensors="pt")).logits[0], dim=-1)
    assert torch.allclose(served_logprobs, torch.stack(own), atol=1e-5), (served_logprobs, own)
    # The check can fail: dropping the pair's second text moves the answer well past the tolerance.
    assert (alone - own[0]).abs().max() > 1e-4

    one = served.post("/classifications", {"model": model_id, "input": pairs[0]}).json()  # one object, no list
    assert one["data"][0]["labels"][0]["probability"] == pytest.approx(
        response.json()["data"][0]["labels"][0]["probability"], rel=1e-5)

    refused = served.post("/classifications", {"model": model_id, "input": "the movie is good"})
    assert "text pairs" in error(refused, 400, "input")
    assert refused.json()["error"]["code"] == "invalid_input_kind"
    error(served.post("/classifications", {"model": model_id, "input": ["a", "b"]}), 400, "input")


def test_a_single_text_classifier_refuses_pairs_and_an_unrecorded_one_takes_both(served, zoo, tmp_path):
    pair = {"text": "good movie", "text_pair": "bad film"}
    single = tmp_path / "single"
    shutil.copytree(zoo.adapters["clf"], single)
    meta = json.loads((single / "training_meta.json").read_text())
    (single / "training_meta.json").write_text(json.dumps({**meta, "text_pair": False}))
    model_id = publish_classifier(served, "single", single)
    refused = served.post("/classifications", {"model": model_id, "input": [pair]})
    assert "single texts" in error(refused, 400, "input")
    assert refused.json()["error"]["code"] == "invalid_input_kind"
    assert served.post("/classifications", {"model": model_id, "input": "good movie"}).status_code == 200

    # `clf` was written before training recorded the input kind: texts and pairs are both served.
    both = served.post("/classifications", {"model": served.model_ids["clf"], "input": [pair, pair]})
    assert both.status_code == 200, both.text
    first, second = (row["labels"] for row in both.json()["data"])
    # The same pair twice in one batch: the same answer, up to float rounding (CPU kernels may block two rows
    # differently under load; 4e-8 apart was seen).
    assert [label["label"] for label in first] == [label["label"] for label in second]
    assert [label["probability"] for label in first] == pytest.approx([label["probability"] for label in second],
                                                                      rel=1e-5)


def test_a_served_classifier_gives_the_trained_models_probabilities_pooler_included(served, zoo):
    from transformers import AutoTokenizer

    from testkit.tiny_models import load_tiny

    assert json.loads((zoo.adapters["clf"] / "adapter_config.json").read_text())["modules_to_save"] == [
        "bert.pooler", "classifier"]
    trained = perturbed_svfit_model(zoo.bert, **CLF).eval()  # the very model the adapter was saved from
    frozen_pooler = perturbed_svfit_model(zoo.bert, **CLF).eval()
    frozen_pooler.model.bert.pooler.load_state_dict(load_tiny(zoo.bert, "classification").bert.pooler.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(zoo.bert)
    texts = ["good movie", "the food was terrible"]
    response = served.post("/classifications", {"model": served.model_ids["clf"], "input": texts})
    assert response.status_code == 200, response.text
    for text, item in zip(texts, response.json()["data"], strict=True):
        got = {entry["label"]: entry["probability"] for entry in item["labels"]}
        enc = tokenizer(text, return_tensors="pt", return_token_type_ids=True)
        with torch.no_grad():
            want, stale = (torch.softmax(m(**enc).logits[0], dim=-1) for m in (trained, frozen_pooler))
        assert [got[label] for label in ("negative", "positive")] == pytest.approx(want.tolist(), abs=1e-5)
        assert (want - stale).abs().max() > 1e-3  # so serving the base's pooler would have failed above


def test_engine_failure_mid_stream_ends_with_an_error_event(served, monkeypatch):
    fail_shared_forward(monkeypatch, on_call=3)
    response = complete(served, served.model_ids["sv0"], ignore_eos=True, stream=True)
    lines = [line for line in response.text.split("\n") if line]
    last = json.loads(lines[-1][len("data: "):])
    assert last["error"]["type"] == "server_error"
    assert "data: [DONE]" not in lines
    monkeypatch.undo()
    assert complete(served, served.model_ids["sv0"]).status_code == 200  # the engine goes on


def manual_embeddings(folder, texts: list[str], adapter=None) -> torch.Tensor:
    """Mean of the encoder's token states over real tokens, scaled to unit length, written out here."""
    from svfit_core.training.outputs import load_trained_model
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if adapter is None:
        encoder = AutoModel.from_pretrained(folder)
    else:
        classifier, _, _ = load_trained_model(folder, adapter)
        encoder = classifier.base_model
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
            states = encoder.eval()(**enc).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(states.mean(0), dim=0))
    return torch.stack(out)


def test_embeddings_of_an_encoder_and_of_its_classification_fine_tune(served, zoo):
    texts = ["the movie was good", "i love this", "what is good ?"]
    base = served.post("/embeddings", {"model": BERT, "input": texts})
    assert base.status_code == 200, base.text
    body = base.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    got = torch.tensor([d["embedding"] for d in body["data"]])
    assert torch.allclose(got, manual_embeddings(zoo.bert, texts), atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    tuned = served.post("/embeddings", {"model": served.model_ids["clf"], "input": texts}).json()
    tuned_vectors = torch.tensor([d["embedding"] for d in tuned["data"]])
    assert torch.allclose(tuned_vectors, manual_embeddings(zoo.bert, texts, zoo.adapters["clf"]), atol=1e-5)
    assert not torch.allclose(tuned_vectors, got, atol=1e-3), "the adapter changes the encoder"

    packed = served.post("/embeddings", {"model": BERT, "input": texts[0], "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(got[0].tolist(), abs=1e-6)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": ""}, 400, "input"), ({"input": []}, 400, "input"), ({"input": [[]]}, 400, "input"),
    ({"input": ["a", 1]}, 400, "input"), ({"input": [10**6]}, 400, "input"), ({"input": "x", "dimensions": 3}, 400,
                                                                              "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"), ({"input": ["x"] * 2049}, 400, "input"),
    ({"input": "the " * 600}, 400, "input"),
])
def test_invalid_embedding_requests_are_400_naming_the_field(served, body, status, param):
    error(served.post("/embeddings", {"model": BERT, **body}), status, param)


def test_a_text_generator_gives_no_embeddings(served):
    error(served.post("/embeddings", {"model": LLAMA, "input": "hello"}), 400, "model")
    error(served.post("/embeddings", {"model": served.model_ids["sv0"], "input": "hello"}), 400, "model")


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tool_choice"),
])
def test_a_grammar_on_a_tokenizer_it_cannot_read_is_a_400_naming_the_field(served, body, param):
    # The tiny Llama's word-level tokenizer has no decoder that tells its tokens' bytes (tests/serving/
    # test_structured.py runs grammars on a real tokenizer).
    message = error(chat(served, LLAMA, messages=[{"role": "user", "content": "hi"}], **body), 400, param)
    assert "cannot be enforced" in message
