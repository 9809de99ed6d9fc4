"""The official `openai` client against a real uvicorn server (a thread on a free port) routing to a serving
replica (another one), and a client that hangs up mid-stream: the replica's rows leave the batch."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from serving.scheduler import Scheduler
from api.main import create_app
from api.services.keys import create_api_key
from serving.embedded import ReplicaThread
from tests.serving.conftest import BERT, LLAMA, make_settings, publish
from tests.network import uvicorn_in_thread


@pytest.fixture(scope="module")
def server(tmp_path_factory, zoo) -> Iterator[tuple[str, str, object, dict]]:
    settings = make_settings(tmp_path_factory.mktemp("uvicorn"), zoo)
    app = create_app(settings, dispatch=lambda job_id: None, auto_migrate=True)
    with app.state.sessionmaker() as session:
        org_id, key = create_api_key(session, "alpha")
    ids = publish(app, org_id, zoo, settings.data_dir)
    with ReplicaThread(settings) as replica, uvicorn_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}", key, replica.app.state.inference, ids


@pytest.fixture
def client(server) -> OpenAI:
    base_url, key, _, _ = server
    return OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_chat_stream_matches_non_streamed(client, server):
    model = server[3]["sv0"]
    messages = [{"role": "user", "content": "what is good ?"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert whole.choices[0].finish_reason in ("stop", "length")


def test_openai_completions(client):
    completion = client.completions.create(model=LLAMA, prompt="the movie was", max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    streamed = client.completions.create(model=LLAMA, prompt="the movie was", max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True}, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_openai_chat_logprobs_streamed_and_not(client, server):
    model = server[3]["sv0"]
    request = dict(model=model, messages=[{"role": "user", "content": "what is good ?"}], max_tokens=6,
                   temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**request)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.logprob == entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes) == entry.token.encode()
    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(**{**request, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_openai_completion_logprobs(client):
    request = dict(model=LLAMA, prompt="the movie was", max_tokens=5, temperature=0, logprobs=3,
                   extra_body={"ignore_eos": True})
    completion = client.completions.create(**request)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(len(top) <= 3 and max(top.values()) == lp for top, lp in zip(logprobs.top_logprobs,
                                                                             logprobs.token_logprobs))
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    streamed = list(client.completions.create(**request, stream=True))
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


def test_openai_completion_echo_scores_a_prompt(client):
    # lm-evaluation-harness's loglikelihood request: echo, logprobs and no (or one) new token.
    scored = client.completions.create(model=LLAMA, prompt="the movie was good", max_tokens=0, echo=True,
                                       logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == "the movie was good" and scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == scored.usage.prompt_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    one_more = client.completions.create(model=LLAMA, prompt="the movie was good", max_tokens=1, echo=True,
                                         logprobs=1, temperature=0, extra_body={"ignore_eos": True})
    extra = one_more.choices[0].logprobs
    assert extra.token_logprobs[:-1] == logprobs.token_logprobs and len(extra.tokens) == len(logprobs.tokens) + 1
    streamed = list(client.completions.create(model=LLAMA, prompt="the movie was good", max_tokens=0, echo=True,
                                              logprobs=1, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        logprobs.token_logprobs


def test_openai_embeddings(client, server):
    texts = ["the movie was good", "i love this"]
    default = client.embeddings.create(model=BERT, input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model=BERT, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    for packed, plain in zip(default.data, floats.data):
        assert packed.embedding == pytest.approx(plain.embedding, abs=1e-6)
        assert sum(x * x for x in plain.embedding) == pytest.approx(1.0, abs=1e-5)
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0
    tuned = client.embeddings.create(model=server[3]["clf"], input=texts[0])
    assert len(tuned.data[0].embedding) == len(plain.embedding)


def test_openai_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="ft:nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert info.value.body["param"] == "temperature"


def test_openai_tools_are_taken_and_encoder_chat_is_refused(client):
    import openai

    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]  # short: the tiny model's context is 64 tokens
    for stream in (False, True):
        answer = client.chat.completions.create(model=LLAMA, messages=messages, tools=tools, stream=stream,
                                                max_tokens=3)
        assert (list(answer) if stream else answer.choices)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=LLAMA, messages=messages, tools=tools, tool_choice="sometimes",
                                           stream=stream)
        assert info.value.body["param"] == "tool_choice" and info.value.code == "invalid_parameter"
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=BERT, messages=messages, stream=stream)
        assert info.value.body["param"] == "model" and info.value.code == "model_not_generative"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BERT, prompt="the movie was")
    assert info.value.body["param"] == "model"


def test_client_hanging_up_mid_stream_frees_its_rows(server, monkeypatch):
    base_url, key, engine, ids = server
    original = Scheduler._decode
    monkeypatch.setattr(Scheduler, "_decode", lambda self, state: (time.sleep(0.02), original(self, state)))
    body = {"model": ids["sv1"], "prompt": "the movie was", "max_tokens": 50, "ignore_eos": True, "stream": True,
            "n": 2}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=30) as response:
        assert response.status_code == 200
        for _line in response.iter_lines():
            if engine.stats()["decoding"] == 2:  # both rows decoding (stats lag a step)
                break  # leaving iter_lines closes the stream: the client hangs up
    hung_up = time.monotonic()
    wait_until(lambda: engine.stats()["decoding"] == 0)
    # 50 tokens at ≥ 20 ms a step take a second: the rows left early because the client did
    assert time.monotonic() - hung_up < 0.8


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
