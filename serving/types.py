"""The plain values that cross between the HTTP side and the engine thread: what to run and what came out.

No torch here: the routes build these before the engine (and its imports) is ever touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from serving.tool_use import ToolUse

Task = Literal["causal", "classification"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ModelRef:
    """A servable model as the engine needs it: the base weights and, for a fine-tune, its adapter folder.

    ``method`` is the training method (``svfit``, ``lora``, ``pissa``, ``full``, ``head_only``), None for a
    base model; ``label_names`` are a classifier's labels. ``text_pair``: whether a classifier was trained on
    text pairs (True) or single texts (False); None where nothing says (a base, an adapter from before
    training recorded it): it takes either.
    """

    model_id: str
    base_id: str
    base_path: Path
    task: Task = "causal"
    adapter_dir: Path | None = None
    method: str | None = None
    label_names: tuple[str, ...] | None = None
    text_pair: bool | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling options. ``max_tokens`` None: the request did not say (the engine picks, knowing
    the prompt's length). ``temperature`` 0 is greedy decoding."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # The request field that set max_tokens, for errors about it (chat accepts max_completion_tokens too).
    max_tokens_param: str = "max_tokens"
    ignore_eos: bool = False  # extension (as vLLM's): generate max_tokens whatever the model says; benchmarks
    # None: no log probabilities; k >= 0: each generated token's, with the k most likely tokens at its step.
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    echo: bool = False  # completions: the answer starts with the prompt (and its tokens' log probabilities)


@dataclass(frozen=True)
class GenerationRequest:
    """One completions or chat request. Exactly one of ``prompts`` (each a string or token ids) and
    ``messages`` is set; every prompt gets ``sampling.n`` choices."""

    ref: ModelRef
    sampling: SamplingParams
    prompts: tuple[str | tuple[int, ...], ...] = ()
    messages: tuple[dict, ...] | None = None
    default_max_tokens: int | None = None  # None: as many as the context leaves
    tool_use: ToolUse | None = None  # a chat request's tools (serving/tool_use.py), None when it declares none
    grammar: str | None = None  # what every choice must follow (serving/structured.py), None: free text
    grammar_param: str = "response_format"  # the request field the grammar comes from, for error messages


@dataclass(frozen=True)
class Admission:
    """What the engine knows once it accepted a request: its prompt sizes and the row count."""

    prompt_tokens: int
    choices: int
    max_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    """A token as OpenAI's logprobs name it (text and UTF-8 bytes), its log probability, and the most
    likely tokens at its step (empty for the alternatives themselves). A prompt's first token, echoed, has
    no log probability (nothing before it predicts it): ``logprob`` None."""

    token: str
    bytes: tuple[int, ...]
    logprob: float | None
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text of one choice, and the log probabilities of the tokens generated with it, when asked for.
    Either may be empty: text can be held back (a possible stop sequence) after its token is known."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ChoiceFinished:
    index: int
    finish_reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class GenerationDone:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Choice:
    """A finished choice, assembled from its events (non-streaming responses)."""

    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ClassificationRequest:
    """Texts to classify; with ``text_pairs`` (as long as ``inputs``) each is the first text of a pair."""

    ref: ModelRef
    inputs: tuple[str, ...]
    text_pairs: tuple[str, ...] | None = None


@dataclass
class ClassificationResult:
    labels: list[str]
    probabilities: list[list[float]] = field(default_factory=list)  # per input, in label order
    prompt_tokens: int = 0


@dataclass(frozen=True)
class EmbeddingRequest:
    """Inputs (strings, or token ids) to embed with an encoder model."""

    ref: ModelRef
    inputs: tuple[str | tuple[int, ...], ...]


@dataclass
class EmbeddingResult:
    vectors: list[list[float]] = field(default_factory=list)  # unit length, one per input
    prompt_tokens: int = 0
