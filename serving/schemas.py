"""Request and response bodies of the inference endpoints: completions, chat completions, embeddings,
classifications.

Field names follow the OpenAI API as the official client sends and reads them; unknown request keys are
ignored, but not structured outputs, which are not served yet: `response_format` is declared so that
serving/requests.py can refuse a request that asks for one; tools are checked by serving/tool_use.py. Ranges the client can get wrong are checked here so the 400 names the field (`temperature`,
`top_p`, `n`, `max_tokens`, the penalties, `logprobs` / `top_logprobs`). Extensions: `ignore_eos` on
generation requests, and `/v1/classifications` (texts or text pairs).
Streaming chunks are plain dicts built in the route (they are never validated, only written).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- requests ------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationCreate(BaseModel):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) → bias in [-100, 100] added to its logit before sampling."
    )
    ignore_eos: bool = Field(default=False, description="Extension: keep generating past EOS up to max_tokens.")
    # Chat completions only (serving/tool_use.py checks them, naming the field); completions refuse them. Typed
    # loosely so a malformed one is a 400 naming the field rather than a type error. `parallel_tool_calls` is
    # ignored: the model may write several calls either way.
    tools: Any = Field(default=None, description="Functions the model may call (chat completions).")
    tool_choice: Any = Field(default=None, description='"none", "auto", "required" or {"type": "function", ...}.')
    functions: Any = Field(default=None, description="Legacy `tools`.")
    function_call: Any = Field(default=None, description="Legacy `tool_choice`.")
    response_format: Any = Field(default=None, description='Not supported yet: refused unless {"type": "text"}.')


class CompletionCreate(GenerationCreate):
    # str | list[str] | list[int] | list[list[int]]; typed loosely so that api/services/inference.py (not a
    # pydantic union error) reports a malformed prompt as `param: "prompt"`.
    prompt: str | list[str | int | list[int]]
    # 0 is allowed with `echo` (score a prompt without generating), refused otherwise.
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=5,
                                 description="The log probability of each token and of the k most likely ones.")
    echo: bool = Field(default=False, description="Start the answer with the prompt (and its log probabilities).")


class ChatMessage(BaseModel):
    # Extra keys (name, tool_calls, tool_call_id ...) reach the chat rendering as sent (svfit_core/tool_calls.py).
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionCreate(GenerationCreate):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class EmbeddingCreate(BaseModel):
    model: str
    # str | list[str] | list[int] | list[list[int]], typed loosely for the reason given on CompletionCreate.
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each embedding as the base64 of its little-endian float32 bytes."
    )
    dimensions: int | None = Field(default=None, ge=1, description="Must equal the model's own, when given.")


class ClassificationCreate(BaseModel):
    model: str
    # Objects typed loosely for the reason given on CompletionCreate: serving/requests.py names `input`.
    input: str | dict[str, Any] | list[str | dict[str, Any]] = Field(
        description='A text, a list of texts, a text pair `{"text": ..., "text_pair": ...}` or a list of pairs.'
    )


# --- responses -----------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token (echoed prompt tokens first)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionPublic(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallPublic(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI returns it


class ToolCallPublic(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallPublic


class ChatMessagePublic(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallPublic] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobPublic(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobPublic] | None
    refusal: list[TokenLogprobPublic] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessagePublic
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionPublic(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class LabelProbability(BaseModel):
    label: str
    probability: float


class ClassificationPublic(BaseModel):
    index: int
    object: Literal["classification"] = "classification"
    label: str
    labels: list[LabelProbability] = Field(description="Every label with its probability, most likely first.")


class ClassificationsPublic(BaseModel):
    id: str
    object: Literal["list"] = "list"
    model: str
    data: list[ClassificationPublic]
    usage: Usage


class EmbeddingPublic(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingPublic]
    model: str
    usage: EmbeddingUsage
