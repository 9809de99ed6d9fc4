"""Admission at the replica's edge: an OpenAI request body turned into what the engine runs, with OpenAI's
defaults and limits validated (sampling options, stop sequences, logit bias, prompt and input forms, and
whether a classifier takes texts or text pairs). Knows nothing of HTTP; which weights a model id names is
`served_models.py`'s job.
"""

from __future__ import annotations

from dataclasses import replace

from api.core.errors import InvalidParameter, UnsupportedParameter, WrongInputKind
from api.core.settings import Settings
from serving.schemas import ChatCompletionCreate, CompletionCreate, EmbeddingCreate, GenerationCreate
from serving.structured import response_format_grammar
from serving.tool_use import check_tool_use
from serving.types import ClassificationRequest, EmbeddingRequest, GenerationRequest, ModelRef, SamplingParams

# OpenAI's limits: 4 stop sequences; completions default to 16 tokens.
MAX_STOP_SEQUENCES = 4
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
MAX_CLASSIFICATION_INPUTS = MAX_EMBEDDING_INPUTS
PAIR_KEYS = ("text", "text_pair")  # a text pair as training reads one (svfit_core.training.data)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Legacy completions take no tools (chat completions do, serving/tool_use.py). A request may still carry these
# fields with a value that asks for nothing (some clients always send them); any other value is refused, naming
# the field. Structured outputs are not served yet on either endpoint.
ASKS_FOR_NOTHING = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),  # "auto" without tools: nothing to call
    "function_call": (None, "none", "auto"),
}


def refuse_unserved(body: GenerationCreate) -> None:
    """A 400 `unsupported_parameter` for what legacy completions do not serve: tools and structured outputs
    (chat completions serve both)."""
    for field, harmless in ASKS_FOR_NOTHING.items():
        value = getattr(body, field)
        if value not in harmless:
            raise UnsupportedParameter(f"'{field}' is not supported on completions: tool calling is served by "
                                       "/v1/chat/completions. Send the request without it.", param=field)
    fmt = body.response_format
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if fmt is not None and kind != "text":
        of_kind = f" of type {kind!r}" if isinstance(kind, str) else ""
        raise UnsupportedParameter(f"'response_format'{of_kind} is not supported on completions: structured "
                                   'outputs are served by /v1/chat/completions. Leave it out, or send '
                                   '{"type": "text"}.', param="response_format")


def check_tool_messages(messages: list[dict]) -> None:
    """The conversation's calls and results, as a training line's are checked (svfit_core/training/tool_data.py):
    a call with a name and JSON arguments, a tool result answering an earlier call."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        for j, call in enumerate(message.get("tool_calls") or ()):
            where = f"messages[{i}].tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidParameter(f"'{where}' must be {{\"id\": ..., \"type\": \"function\", \"function\": "
                                       "{\"name\": ..., \"arguments\": ...}}.", param=where)
            if isinstance(call.get("id"), str):
                called.add(call["id"])
        if message.get("role") == "tool" and message.get("tool_call_id") not in called:
            raise InvalidParameter(f"'messages[{i}]' answers tool call {message.get('tool_call_id')!r}, which no "
                                   "earlier assistant message made.", param=f"messages[{i}].tool_call_id")


def sampling_params(
    body: GenerationCreate,
    settings: Settings,
    max_tokens: int | None,
    max_tokens_param: str = "max_tokens",
    logprobs: int | None = None,
) -> SamplingParams:
    """The request's sampling options with OpenAI's defaults (temperature 1, top_p 1, n 1, no penalties)."""
    n = body.n or 1
    if n > settings.inference_max_n:
        raise InvalidParameter(f"'n' must be at most {settings.inference_max_n}, got {n}.", param="n")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidParameter(f"'stop' holds at most {MAX_STOP_SEQUENCES} sequences.", param="stop")
    return SamplingParams(
        logit_bias=logit_bias(body.logit_bias),
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        n=n,
        stop=tuple(s for s in stop if s),
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        max_tokens_param=max_tokens_param,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (JSON keys, so strings) to biases in [-100, 100], as (id, bias) pairs.
    Whether each id exists in the model's vocabulary is checked by the engine, which knows the tokenizer."""
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidParameter(f"'logit_bias' holds at most {MAX_LOGIT_BIAS_TOKENS} tokens.", param="logit_bias")
    pairs = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise InvalidParameter(f"'logit_bias' keys must be token ids, got {key!r}.", param="logit_bias")
        if not -100 <= value <= 100:
            raise InvalidParameter(f"'logit_bias' values must be in [-100, 100], got {value}.", param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def completion_request(body: CompletionCreate, ref: ModelRef, settings: Settings) -> GenerationRequest:
    refuse_unserved(body)
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: tuple = (prompt,)
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = (tuple(prompt),)  # one prompt given as token ids
    elif prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        prompts = tuple(p if isinstance(p, str) else tuple(p) for p in prompt)
    else:
        raise InvalidParameter(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists.", param="prompt"
        )
    if body.max_tokens == 0 and not body.echo:
        raise InvalidParameter("'max_tokens' must be at least 1 unless 'echo' is true.", param="max_tokens")
    sampling = replace(sampling_params(body, settings, body.max_tokens, logprobs=body.logprobs), echo=body.echo)
    return GenerationRequest(
        ref=ref,
        sampling=sampling,
        prompts=prompts,
        default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
    )


def chat_request(body: ChatCompletionCreate, ref: ModelRef, settings: Settings) -> GenerationRequest:
    tool_use = check_tool_use(body.tools, body.tool_choice, body.functions, body.function_call)
    grammar = response_format_grammar(body.response_format)
    if grammar is not None and tool_use is not None and tool_use.grammar is not None:
        raise InvalidParameter("A structured 'response_format' and a required tool call cannot both shape one "
                               "answer: drop one, or let 'tool_choice' be \"auto\".", param="response_format")
    grammar_param = "response_format" if grammar is not None else "tool_choice"
    grammar = grammar or (tool_use.grammar if tool_use is not None else None)
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = body.max_tokens, "max_tokens"
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParameter("'top_logprobs' needs 'logprobs' to be true.", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    messages = tuple(m.model_dump(exclude_none=True) for m in body.messages)
    check_tool_messages(list(messages))
    # Without max_tokens a chat answer may run to the end of the context, as OpenAI's does.
    sampling = sampling_params(body, settings, max_tokens, param, logprobs)
    return GenerationRequest(ref=ref, sampling=sampling, messages=messages, tool_use=tool_use, grammar=grammar,
                             grammar_param=grammar_param)


def classification_request(inputs: str | dict | list[str | dict], ref: ModelRef) -> ClassificationRequest:
    """The texts, or text pairs, to classify: one string, a list of strings, one object ``{"text", "text_pair"}``
    or a list of such objects (never a mix). A classifier trained on pairs takes only pairs, one trained on
    single texts only strings; where training recorded neither (``ref.text_pair`` None) both are taken."""
    items = [inputs] if isinstance(inputs, (str, dict)) else list(inputs)
    if not items:
        raise InvalidParameter("'input' must not be empty.", param="input")
    if len(items) > MAX_CLASSIFICATION_INPUTS:
        raise InvalidParameter(f"'input' holds at most {MAX_CLASSIFICATION_INPUTS} items.", param="input")
    if all(isinstance(i, str) for i in items):
        texts, pairs = tuple(items), None
    elif all(isinstance(i, dict) for i in items):
        checked = [_text_pair(i) for i in items]
        texts, pairs = tuple(text for text, _ in checked), tuple(pair for _, pair in checked)
    else:
        raise InvalidParameter(
            "'input' must be a string, a list of strings, an object {\"text\": ..., \"text_pair\": ...} or a list "
            "of such objects, not a mix of strings and objects.", param="input")
    if ref.text_pair is not None and ref.text_pair != (pairs is not None):
        expected = ('text pairs: send each input as {"text": ..., "text_pair": ...}' if ref.text_pair
                    else "single texts: send each input as a string")
        raise WrongInputKind(f"The model '{ref.model_id}' was trained on {expected}.", param="input")
    return ClassificationRequest(ref=ref, inputs=texts, text_pairs=pairs)


def _text_pair(item: dict) -> tuple[str, str]:
    """A pair object's two texts, checked as the upload validator checks a training line's."""
    if set(item) != set(PAIR_KEYS):
        raise InvalidParameter("A text pair in 'input' takes exactly the keys 'text' and 'text_pair'.",
                               param="input")
    for key in PAIR_KEYS:
        if not isinstance(item[key], str):
            raise InvalidParameter(f"'{key}' in 'input' must be a string, got {type(item[key]).__name__}.",
                                   param="input")
    return item["text"], item["text_pair"]


def embedding_request(body: EmbeddingCreate, ref: ModelRef) -> EmbeddingRequest:
    """The inputs as strings or token-id tuples: one string, a list of strings, one list of token ids, or a
    list of such lists (OpenAI's four forms)."""
    items = body.input
    if isinstance(items, str):
        inputs: tuple = (items,)
    elif items and all(isinstance(t, int) for t in items):
        inputs = (tuple(items),)
    elif items and (all(isinstance(i, str) for i in items) or all(isinstance(i, list) for i in items)):
        inputs = tuple(i if isinstance(i, str) else tuple(i) for i in items)
    else:
        raise InvalidParameter(
            "'input' must be a string, a list of strings, a list of token ids or a list of such lists.", param="input"
        )
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidParameter(f"'input' holds at most {MAX_EMBEDDING_INPUTS} items.", param="input")
    if any(len(i) == 0 for i in inputs):
        raise InvalidParameter("'input' must not hold an empty string or an empty list of tokens.", param="input")
    return EmbeddingRequest(ref=ref, inputs=inputs)
