"""Grammar-constrained decoding with llguidance: OpenAI's `response_format` (a JSON object, or one that
validates against a JSON schema) and a tool call that `tool_choice` makes required, as grammars, and the
per-row constraint that lets the sampler choose only the tokens a grammar allows
(``svfit_core.sampling.TokenConstraint``).

A grammar is compiled from the request alone (`response_format_grammar`, `tool_call_grammar`), so a schema
llguidance cannot compile is a 400 naming the field before the engine sees the request. Each lane wraps its
tokenizer for llguidance once (`grammar_tokenizer`, about a second for a 50k vocabulary). JSON comes out as
`json.dumps` writes it (", " and ": " between items, no other whitespace): a model cannot pad it with
whitespace until `max_tokens` runs out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch
from llguidance import LLMatcher

from api.core.errors import InvalidParameter
from svfit_core.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

__all__ = ["GrammarConstraint", "grammar_tokenizer", "response_format_grammar", "tool_call_grammar"]

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The grammar of a tool call's JSON takes the tool's `parameters` as the schema of its arguments; a tool
# without one takes any object.
ANY_OBJECT = {"type": "object"}


def _checked(grammar: str, param: str) -> str:
    error = LLMatcher.validate_grammar(grammar, None)
    if error and not error.startswith("WARNING"):
        raise InvalidParameter(f"'{param}' cannot be enforced: {error}", param=param)
    return grammar


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar of OpenAI's `response_format`: None for text (or none given), any JSON object for
    {"type": "json_object"}, the schema's documents for {"type": "json_schema", "json_schema": {"name",
    "schema", "strict"?}}. Anything else, or a schema that cannot be compiled, is a 400 naming the field."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _checked(LLMatcher.grammar_from_json_schema(ANY_OBJECT, defaults=JSON_OPTIONS), "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise InvalidParameter("'response_format.json_schema' must be an object with a 'name' and a 'schema'.",
                                   param="response_format.json_schema")
        schema = spec.get("schema", ANY_OBJECT)
        if not isinstance(schema, Mapping):
            raise InvalidParameter("'response_format.json_schema.schema' must be a JSON schema object.",
                                   param="response_format.json_schema.schema")
        grammar = LLMatcher.grammar_from_json_schema(dict(schema), defaults=JSON_OPTIONS)
        return _checked(grammar, "response_format.json_schema.schema")
    raise InvalidParameter('\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
                           '{"type": "json_schema", "json_schema": {...}}.', param="response_format")


def _call_schema(tool: Mapping[str, Any]) -> dict:
    function = tool["function"]
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or ANY_OBJECT},
            "required": ["name", "arguments"], "additionalProperties": False,
            "x-guidance": JSON_OPTIONS}


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], param: str) -> str:
    """One call (``<tool_call>`` JSON ``</tool_call>``, as ``svfit_core.tool_calls`` renders calls) to one of
    ``tools``, its arguments valid against that tool's `parameters`. A schema that cannot be compiled is a 400
    naming ``param``."""
    schema = _call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [_call_schema(t) for t in tools],
                                                              "x-guidance": JSON_OPTIONS}
    lark = (f"start: {json.dumps(TOOL_CALL_OPEN + chr(10))} call {json.dumps(chr(10) + TOOL_CALL_CLOSE)}\n"
            f"call: %json {json.dumps(schema)}\n")
    return _checked(LLMatcher.grammar_from_lark(lark), param)


def grammar_tokenizer(tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> llguidance.LLTokenizer | None:
    """The lane's tokenizer as llguidance reads it (a fast Hugging Face tokenizer with a byte-level or
    SentencePiece decoder), over the model's logit width, the end of a grammar any of ``eos_ids``; None when
    llguidance cannot read this tokenizer."""
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
    except ValueError:  # a slow tokenizer, or one whose tokens' bytes cannot be told (no decoder)
        return None


_BITS = torch.arange(8, dtype=torch.uint8)


class GrammarConstraint:
    """One row's grammar: the tokens it allows next, advanced by each token the row chooses. Once the grammar is
    complete only an end-of-sequence token is allowed, so the row stops with a document that parses."""

    def __init__(
        self, tokenizer: llguidance.LLTokenizer | None, grammar: str, eos_ids: Sequence[int], param: str
    ) -> None:
        if tokenizer is None:
            raise InvalidParameter(f"This model's tokenizer cannot be constrained by a grammar, so '{param}' cannot "
                                   "be enforced on it.", param=param)
        self.matcher = LLMatcher(tokenizer, grammar)
        self.eos_ids = sorted(eos_ids)
        if self.matcher.is_error():
            raise InvalidParameter(f"'{param}' cannot be enforced: {self.matcher.get_error()}", param=param)
        if not any(self.matcher.compute_bitmask()):
            raise InvalidParameter(f"This model's tokenizer cannot write what '{param}' asks for.", param=param)

    def allowed(self, vocab: int, device: torch.device) -> torch.Tensor:
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        mask = ((bits.unsqueeze(1) >> _BITS) & 1).flatten().bool()[:vocab]
        if mask.numel() < vocab:  # logits wider than the tokenizer (padded embeddings): those ids never allowed
            mask = torch.cat([mask, mask.new_zeros(vocab - mask.numel())])
        if not mask.any():  # a dead end (the matcher failed): end the answer rather than sample from nothing
            mask[[i for i in self.eos_ids if i < vocab]] = True
        return mask.to(device)

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
