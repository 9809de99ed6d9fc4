"""The inference engine on its own thread: batched answers equal each model run alone through the training
library and transformers' ``generate``, continuous batching, cancellation, seeds and stop sequences."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from api.core.errors import InternalError
from serving.engine import InferenceEngine
from serving.lanes import LoraLane, SharedBaseLane
from serving.scheduler import Scheduler
from serving.types import GenerationRequest, ModelRef, SamplingParams, TextDelta
from svfit_core.training.outputs import load_trained_model
from svfit_core.loading import load_base_model
from tests.serving.conftest import LLAMA, fail_shared_forward, make_settings

PROMPTS = ["the movie was", "i love this", "what is good ?", "hello world"]


@pytest.fixture(scope="module")
def engine(zoo, tmp_path_factory):
    engine = InferenceEngine(make_settings(tmp_path_factory.mktemp("engine"), zoo, inference_batch_window_ms=20))
    yield engine
    engine.stop()


def ref(zoo, name: str | None) -> ModelRef:
    if name is None:
        return ModelRef(model_id=LLAMA, base_id=LLAMA, base_path=zoo.llama)
    folder = zoo.adapters[name]
    meta = json.loads((folder / "training_meta.json").read_text())
    return ModelRef(model_id=name, base_id=LLAMA, base_path=zoo.llama, adapter_dir=folder, method=meta["method"])


def greedy(model_ref: ModelRef, prompt: str, max_tokens: int = 10, **sampling) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)
    return GenerationRequest(ref=model_ref, sampling=params, prompts=(prompt,))


async def answer(engine: InferenceEngine, request: GenerationRequest) -> list:
    ticket = await engine.generate(request)
    choices, _ = await ticket.collect()
    return choices


async def answers(engine: InferenceEngine, requests: list[GenerationRequest]) -> list:
    return await asyncio.gather(*(answer(engine, r) for r in requests))


def spy(forward, seen: list):
    def recording(self, tags, **inputs):
        seen.append(set(tags))
        return forward(self, tags, **inputs)

    return recording


@torch.no_grad()
def reference_text(zoo, name: str | None, prompt: str, max_tokens: int = 10) -> str:
    """The same model alone, loaded by the training library and decoded by transformers' generate."""
    if name is None:
        model, tokenizer = load_base_model(zoo.llama, "causal")
    else:
        model, tokenizer, _ = load_trained_model(zoo.llama, zoo.adapters[name])
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.eval().generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_mixed_batch_equals_each_model_alone(zoo, engine, monkeypatch):
    seen: list[set] = []  # the distinct adapters of every forward on a shared or LoRA lane
    for lane in (SharedBaseLane, LoraLane):
        monkeypatch.setattr(lane, "forward", spy(lane.forward, seen))
    names = [None, "sv0", "sv1", "sv2", "sv_qv", "lora0", "lora1", "full0"]
    requests = [greedy(ref(zoo, n), PROMPTS[i % len(PROMPTS)]) for i, n in enumerate(names)]
    got = asyncio.run(answers(engine, requests))
    assert max(len(tags) for tags in seen) == 5  # base + 4 SVFit adapters in one forward
    assert {len(tags) for tags in seen} >= {2}  # the two LoRA adapters mixed by PEFT
    texts = [choices[0].text for choices in got]
    for i, name in enumerate(names):
        assert texts[i] == reference_text(zoo, name, PROMPTS[i % len(PROMPTS)]), name
    # adapters change answers: otherwise this test could not tell batching from ignoring them
    same_prompt = asyncio.run(answers(engine, [greedy(ref(zoo, n), "the movie was") for n in (None, "sv0", "sv1")]))
    assert len({c[0].text for c in same_prompt}) == 3


def test_request_joining_a_running_batch_gets_the_same_answer(zoo, engine, monkeypatch):
    original = Scheduler._decode

    def slow_decode(self, state):  # keep the first request decoding while the second arrives
        time.sleep(0.01)
        original(self, state)

    monkeypatch.setattr(Scheduler, "_decode", slow_decode)

    async def staggered():
        first = asyncio.ensure_future(answer(engine, greedy(ref(zoo, "sv0"), PROMPTS[0], 30, ignore_eos=True)))
        await asyncio.sleep(0.1)
        assert engine.stats()["decoding"] == 1
        second = await answer(engine, greedy(ref(zoo, "sv1"), PROMPTS[1], 10))
        return await first, second

    first, second = asyncio.run(staggered())
    alone = asyncio.run(answers(engine, [greedy(ref(zoo, "sv0"), PROMPTS[0], 30, ignore_eos=True),
                                         greedy(ref(zoo, "sv1"), PROMPTS[1], 10)]))
    assert first[0].text == alone[0][0].text and first[0].completion_tokens == 30
    assert second[0].text == alone[1][0].text


def test_cancelled_request_leaves_the_batch(zoo, engine, monkeypatch):
    original = Scheduler._decode
    monkeypatch.setattr(Scheduler, "_decode", lambda self, state: (time.sleep(0.01), original(self, state)))

    async def cancel_after_first_token():
        ticket = await engine.generate(greedy(ref(zoo, "sv2"), PROMPTS[2], 50, ignore_eos=True))
        async for event in ticket.stream():
            if isinstance(event, TextDelta):
                break
        ticket.cancel()
        deadline = time.monotonic() + 5
        while engine.stats()["decoding"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return engine.stats()

    stats = asyncio.run(cancel_after_first_token())
    assert stats["decoding"] == 0 and stats["waiting"] == 0


def test_seed_reproduces_sampled_answers_and_choices_differ(zoo, engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=123)
    request = GenerationRequest(ref=ref(zoo, "sv1"), sampling=params, prompts=("the movie was",))
    first, again = asyncio.run(answers(engine, [request, request]))
    assert [c.text for c in first] == [c.text for c in again]
    assert len({c.text for c in first}) > 1
    assert [c.index for c in first] == [0, 1, 2]


@torch.no_grad()
def reference_penalized_ids(
    zoo, prompt: str, max_tokens: int, presence: float, frequency: float, bias: dict[int, float] | None = None
) -> list[int]:
    """Greedy decoding of the base model alone, without a cache, with OpenAI's penalty formula and logit bias
    written out."""
    model, tokenizer = load_base_model(zoo.llama, "causal")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated: list[int] = []
    for _ in range(max_tokens):
        logits = model.eval()(torch.cat([ids, torch.tensor([generated], dtype=torch.long)], 1)).logits[0, -1].double()
        for token in set(generated):
            logits[token] -= generated.count(token) * frequency + presence
        for token, value in (bias or {}).items():
            logits[token] += value
        generated.append(int(logits.argmax()))
    return generated


def test_presence_and_frequency_penalties_follow_openais_formula(zoo, engine):
    base, prompt, length = ref(zoo, None), PROMPTS[2], 16
    _, tokenizer = load_base_model(zoo.llama, "causal")
    plain = reference_penalized_ids(zoo, prompt, length, 0.0, 0.0)
    assert len(set(plain)) < length, "the check needs a model that repeats itself unpenalised"
    for presence, frequency in [(0.0, 1.5), (1.0, 0.0), (0.5, 0.5), (-1.0, 0.0)]:
        expected = reference_penalized_ids(zoo, prompt, length, presence, frequency)
        request = greedy(base, prompt, length, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency)
        got = asyncio.run(answer(engine, request))[0]
        assert got.text == tokenizer.decode(expected, skip_special_tokens=True), (presence, frequency)
        if presence > 0 or frequency > 0:
            assert expected != plain and len(set(expected)) > len(set(plain)), (presence, frequency)


def test_logit_bias_shifts_the_tokens_it_names(zoo, engine):
    base, prompt, length = ref(zoo, None), PROMPTS[3], 6
    _, tokenizer = load_base_model(zoo.llama, "causal")
    plain = reference_penalized_ids(zoo, prompt, length, 0.0, 0.0)
    banned = {plain[0]: -100.0, plain[1]: -5.0}
    expected = reference_penalized_ids(zoo, prompt, length, 0.0, 0.0, banned)
    assert expected != plain and plain[0] not in expected
    request = greedy(base, prompt, length, ignore_eos=True, logit_bias=tuple(banned.items()))
    assert asyncio.run(answer(engine, request))[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    good = tokenizer.convert_tokens_to_ids("good")
    sampled = SamplingParams(max_tokens=length, temperature=1.0, seed=3, ignore_eos=True, logit_bias=((good, 100.0),))
    forced = GenerationRequest(ref=base, sampling=sampled, prompts=(prompt,))
    assert asyncio.run(answer(engine, forced))[0].text.split() == ["good"] * length


def test_stop_sequence_ends_the_choice(zoo, engine):
    full = asyncio.run(answer(engine, greedy(ref(zoo, "sv0"), PROMPTS[0], 12, ignore_eos=True)))[0]
    words = full.text.split()
    stop = " ".join(words[2:4])
    cut = asyncio.run(answer(engine, greedy(ref(zoo, "sv0"), PROMPTS[0], 12, ignore_eos=True, stop=(stop,))))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_a_failed_forward_fails_its_requests_and_the_engine_goes_on(zoo, engine, monkeypatch):
    fail_shared_forward(monkeypatch, on_call=1)
    with pytest.raises(InternalError):
        asyncio.run(answer(engine, greedy(ref(zoo, "sv0"), PROMPTS[0])))
    recovered = asyncio.run(answer(engine, greedy(ref(zoo, "sv0"), PROMPTS[0])))
    assert recovered[0].text == reference_text(zoo, "sv0", PROMPTS[0])
    assert engine.stats()["decoding"] == 0


def test_memory_budget_unloads_idle_models_and_reloads_them(zoo, tmp_path):
    # 0.15 MB holds one tiny model copy (about 0.1 MB), not two: each new lane pushes the idle one out.
    small = InferenceEngine(make_settings(tmp_path, zoo, inference_memory_budget_mb=0.15))
    try:
        first = asyncio.run(answer(small, greedy(ref(zoo, "sv0"), PROMPTS[0])))
        asyncio.run(answer(small, greedy(ref(zoo, "full0"), PROMPTS[0])))
        assert [kind for kind, _ in small.stats()["lanes"]] == ["model"]
        again = asyncio.run(answer(small, greedy(ref(zoo, "sv0"), PROMPTS[0])))
        assert [kind for kind, _ in small.stats()["lanes"]] == ["shared"]
        assert again[0].text == first[0].text
    finally:
        small.stop()


def gate_model_loads(monkeypatch, kind: str):
    """Hold every load of a ``kind`` lane until the returned ``release`` is set; ``started`` is set when one
    has begun, and ``calls`` counts them."""
    started, release, calls = threading.Event(), threading.Event(), []
    build = Scheduler.build_lane

    def gated(self, model_ref, key):
        if key[0] == kind:
            calls.append(model_ref.model_id)
            started.set()
            assert release.wait(60), "the test never released the load"
        return build(self, model_ref, key)

    monkeypatch.setattr(Scheduler, "build_lane", gated)
    return started, release, calls


async def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_model_loading_does_not_pause_the_models_already_loaded(zoo, tmp_path, monkeypatch):
    engine = InferenceEngine(make_settings(tmp_path, zoo))
    started, release, calls = gate_model_loads(monkeypatch, "model")

    async def scenario():
        await answer(engine, greedy(ref(zoo, "sv0"), PROMPTS[0]))  # the shared lane is in memory
        waiting = [asyncio.create_task(answer(engine, greedy(ref(zoo, "full0"), p))) for p in PROMPTS[:2]]
        await until(started.is_set)
        loaded = await asyncio.wait_for(answer(engine, greedy(ref(zoo, "sv0"), PROMPTS[2], max_tokens=12)), 60)
        assert not any(task.done() for task in waiting), "requests for the loading model were answered early"
        assert engine.stats()["loading"] == 1
        release.set()
        return loaded, await asyncio.gather(*waiting)

    try:
        loaded, waited = asyncio.run(scenario())
    finally:
        release.set()
        engine.stop()
    assert loaded[0].text == reference_text(zoo, "sv0", PROMPTS[2], max_tokens=12)
    assert [w[0].text for w in waited] == [reference_text(zoo, "full0", p) for p in PROMPTS[:2]]
    assert calls == ["full0"], "the second request waited for the load under way instead of starting another"


def test_a_failed_load_fails_every_request_waiting_for_it_and_the_engine_goes_on(zoo, tmp_path, monkeypatch):
    import serving.lane_manager as scheduler_module  # where load_full_model is looked up

    engine = InferenceEngine(make_settings(tmp_path, zoo))
    started, release, _ = gate_model_loads(monkeypatch, "model")
    real_load = scheduler_module.load_full_model

    def broken(*_args, **_kwargs):
        raise OSError("the weights file is unreadable")

    monkeypatch.setattr(scheduler_module, "load_full_model", broken)

    async def scenario():
        waiting = [asyncio.create_task(answer(engine, greedy(ref(zoo, "full0"), p))) for p in PROMPTS[:2]]
        await until(started.is_set)
        release.set()
        return await asyncio.gather(*waiting, return_exceptions=True)

    try:
        outcomes = asyncio.run(scenario())
        assert [type(o) for o in outcomes] == [InternalError, InternalError]
        assert {o.code for o in outcomes} == {"model_load_failed"}
        monkeypatch.setattr(scheduler_module, "load_full_model", real_load)
        again = asyncio.run(answer(engine, greedy(ref(zoo, "full0"), PROMPTS[0])))
        assert again[0].text == reference_text(zoo, "full0", PROMPTS[0])
        assert engine.stats()["loading"] == 0
    finally:
        release.set()
        engine.stop()


@torch.no_grad()
def reference_logprobs(zoo, name: str | None, prompt: str, max_tokens: int) -> list[torch.Tensor]:
    """The log-softmax of the model's next-token logits at each greedy step, without a cache."""
    if name is None:
        model, tokenizer = load_base_model(zoo.llama, "causal")
    else:
        model, tokenizer, _ = load_trained_model(zoo.llama, zoo.adapters[name])
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    steps = []
    for _ in range(max_tokens):
        logp = torch.log_softmax(model.eval()(ids).logits[0, -1].double(), -1)
        steps.append(logp)
        ids = torch.cat([ids, logp.argmax().view(1, 1)], 1)
    return steps


def test_logprobs_are_the_models_own_distribution_at_each_step(zoo, engine):
    name, prompt, length, k = "sv0", PROMPTS[1], 8, 3
    _, tokenizer, _ = load_trained_model(zoo.llama, zoo.adapters[name])
    expected = reference_logprobs(zoo, name, prompt, length)
    # A temperature and a penalty reshape sampling, not the reported distribution.
    request = greedy(ref(zoo, name), prompt, length, ignore_eos=True, logprobs=k, frequency_penalty=0.0)
    [got] = asyncio.run(answer(engine, request))
    assert len(got.logprobs) == length
    for step, (entry, logp) in enumerate(zip(got.logprobs, expected)):
        best = logp.topk(k)
        assert [alt.token for alt in entry.top] == [tokenizer.decode([int(i)]) for i in best.indices], step
        assert [alt.logprob for alt in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4), step
        assert entry.token == entry.top[0].token and entry.logprob == pytest.approx(float(best.values[0]), abs=1e-4)
        assert bytes(entry.bytes) == entry.token.encode()
    chosen = [int(logp.argmax()) for logp in expected]
    assert got.text == tokenizer.decode(chosen, skip_special_tokens=True)


def test_logprobs_of_sampled_tokens_and_without_alternatives(zoo, engine, monkeypatch):
    import serving.batching as scheduler_module  # where next_tokens is looked up

    sampled: list[int] = []
    real_next_tokens = scheduler_module.next_tokens

    def recording(logits, rows):
        tokens = real_next_tokens(logits, rows)
        sampled.extend(tokens)
        return tokens

    monkeypatch.setattr(scheduler_module, "next_tokens", recording)
    request = GenerationRequest(
        ref=ref(zoo, None), prompts=(PROMPTS[0],),
        sampling=SamplingParams(max_tokens=6, temperature=1.5, seed=7, logprobs=0, ignore_eos=True),
    )
    [got] = asyncio.run(answer(engine, request))
    model, tokenizer = load_base_model(zoo.llama, "causal")
    ids = tokenizer.encode(PROMPTS[0])
    assert len(got.logprobs) == len(sampled) == 6
    off_greedy = 0
    for entry, token_id in zip(got.logprobs, sampled):
        assert entry.top == ()
        with torch.no_grad():
            logp = torch.log_softmax(model.eval()(torch.tensor([ids])).logits[0, -1].double(), -1)
        assert entry.logprob == pytest.approx(float(logp[token_id]), abs=1e-4)
        off_greedy += int(logp.argmax()) != token_id
        ids.append(token_id)
    assert off_greedy, "the check needs tokens that greedy decoding would not have chosen"
    plain = asyncio.run(answer(engine, greedy(ref(zoo, None), PROMPTS[0], 6)))[0]
    assert plain.logprobs == [], "no log probabilities unless asked for"


def test_echo_scores_the_prompt_beside_other_requests(zoo, engine, monkeypatch):
    full_logit_batches = []
    real_forward = Scheduler._forward

    def recording(self, lane, rows, every_position=False, **inputs):
        if every_position:
            full_logit_batches.append(len(rows))
        return real_forward(self, lane, rows, every_position, **inputs)

    monkeypatch.setattr(Scheduler, "_forward", recording)
    base, prompt = ref(zoo, None), PROMPTS[2]
    model, tokenizer = load_base_model(zoo.llama, "causal")
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(model.eval()(torch.tensor([ids])).logits[0].double(), -1)
    scored = GenerationRequest(ref=base, prompts=(prompt,),
                               sampling=SamplingParams(max_tokens=0, temperature=0.0, logprobs=2, echo=True))
    extended = GenerationRequest(ref=base, prompts=(prompt,),
                                 sampling=SamplingParams(max_tokens=5, temperature=0.0, echo=True, ignore_eos=True))
    neighbour = greedy(base, PROMPTS[0], 6, ignore_eos=True)
    [score], [longer], [other] = asyncio.run(answers(engine, [scored, extended, neighbour]))

    assert score.text == prompt and score.finish_reason == "length" and score.completion_tokens == 0
    assert [e.token for e in score.logprobs] == [tokenizer.decode([t]) for t in ids]
    assert score.logprobs[0].logprob is None
    for position, entry in enumerate(score.logprobs[1:]):
        logp = expected[position]
        assert entry.logprob == pytest.approx(float(logp[ids[position + 1]]), abs=1e-4)
        assert [alt.logprob for alt in entry.top] == pytest.approx(logp.topk(2).values.tolist(), abs=1e-4)
    plain = asyncio.run(answer(engine, greedy(base, prompt, 5, ignore_eos=True)))[0]
    assert longer.text == prompt + plain.text and longer.completion_tokens == 5
    assert full_logit_batches == [1], "only the scoring row needs every position's logits"
    alone = asyncio.run(answer(engine, neighbour))[0]
    assert other.text == alone.text, "an echo row in the batch changed another row's answer"


def test_scoring_a_prompt_too_large_for_the_logits_budget_is_refused(zoo, tmp_path):
    from api.core.errors import InvalidParameter

    # The tiny Llama: 96 logits per position, float32, plus their log-softmax: 768 bytes per prompt token.
    small = InferenceEngine(make_settings(tmp_path, zoo, inference_max_scoring_mb=4 * 768 / 2**20))
    base = ref(zoo, None)

    def scoring(prompt: str, logprobs: int | None) -> GenerationRequest:
        return GenerationRequest(ref=base, prompts=(prompt,),
                                 sampling=SamplingParams(max_tokens=0, logprobs=logprobs, echo=True))

    try:
        assert asyncio.run(answer(small, scoring("the movie was", 1)))[0].text == "the movie was"  # 4 tokens
        with pytest.raises(InvalidParameter) as refused:
            asyncio.run(answer(small, scoring("the movie was good", 1)))
        assert refused.value.param == "prompt" and "MB" in str(refused.value)
        assert asyncio.run(answer(small, scoring("the movie was good", None)))[0].text == "the movie was good"
    finally:
        small.stop()
