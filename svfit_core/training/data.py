"""Training files at the JSON level: which format an example is in, what is wrong with a line, and loading a
JSONL file into a list of examples.

Nothing here touches a tokenizer; turning examples into token ids is ``svfit_core.training.encoding``. The same
per-line checks serve the upload validator (``validate_jsonl_line``) and training (``load_examples``), so a
file that passed upload never fails to load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from svfit_core.errors import DataError
from svfit_core.training.tool_data import makes_calls, tool_errors

Format = Literal["chat", "completion", "classification", "classification_pair", "preference", "prompt"]
Task = Literal["causal", "classification"]

# Roles OpenAI's fine-tuning accepts in chat examples ("developer" is its newer name for "system"; "function" is
# the legacy tool result).
KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

_TASK_OF_FORMAT: dict[str, Task] = {
    "chat": "causal",
    "completion": "causal",
    "classification": "classification",
    "classification_pair": "classification",
    # A preference pair trains a causal LM (with the DPO loss, training/preference.py) and serves like one.
    "preference": "causal",
    # A prompt awaits an answer the model samples and a grader scores (reinforcement, training/reinforcement.py).
    "prompt": "causal",
}
# OpenAI's preference format: the conversation so far, and one answer preferred over another.
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")

# A DataError message lists at most this many problems; ``.errors`` keeps them all.
_MAX_ERRORS_IN_MESSAGE = 20


def detect_format(example: dict) -> Format:
    """The format an example is written in, judged by its keys only (its values are checked elsewhere).

    Raises DataError when the keys match no format.
    """
    if not isinstance(example, dict):
        raise DataError(f"an example must be a JSON object, got {type(example).__name__}")
    # The answers mark a preference line; "input" alone is too common a key to claim one.
    if any(key in example for key in PREFERENCE_KEYS[1:]):
        return "preference"
    if "messages" in example:
        return "prompt" if _awaits_answer(example["messages"]) else "chat"
    if "prompt" in example and "completion" in example:
        return "completion"
    if "text" in example and "text_pair" in example:
        return "classification_pair"
    if "text" in example:
        return "classification"
    keys = ", ".join(sorted(example)) or "none"
    raise DataError(
        "unknown format: expected {'messages'}, {'prompt', 'completion'}, {'text', 'label'}, "
        "{'text', 'text_pair', 'label'} or {'input', 'preferred_output', 'non_preferred_output'}, "
        f"got keys: {keys}"
    )


def _awaits_answer(messages: object) -> bool:
    """A conversation whose last message is not the assistant's is a prompt: there is no answer to train on,
    one is sampled and graded (OpenAI's reinforcement format; its other keys are the item graders read)."""
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return False
    return messages[-1].get("role") in KNOWN_ROLES - {"assistant"}


def task_for_format(fmt: Format) -> Task:
    """The training task a format implies: chat and completion train a causal LM, the rest a classifier."""
    return _TASK_OF_FORMAT[fmt]


def validate_example(example: dict, fmt: Format) -> list[str]:
    """Problems with an example's values, for a format already detected (messages without line numbers)."""
    if fmt == "chat":
        return _chat_errors(example)
    if fmt == "completion":
        return _completion_errors(example)
    if fmt == "preference":
        return _preference_errors(example)
    if fmt == "prompt":
        return _prompt_errors(example)
    return _classification_errors(example, pair=fmt == "classification_pair")


def _message_errors(message: object, where: str) -> list[str]:
    """What is wrong with one chat message's role and content."""
    if not isinstance(message, dict):
        return [f"{where} must be an object"]
    errors = []
    role = message.get("role")
    if role is None:
        errors.append(f"{where} has no 'role'")
    elif role not in KNOWN_ROLES:
        errors.append(f"{where} has unknown role {role!r} (expected one of {sorted(KNOWN_ROLES)})")
    if role == "assistant" and makes_calls(message) and message.get("content") is None:
        return errors  # a turn of tool calls only: its content is null or absent, as OpenAI writes it
    if "content" not in message:
        errors.append(f"{where} has no 'content'")
    elif not isinstance(message["content"], str):
        errors.append(f"{where} 'content' must be a string, got {type(message['content']).__name__}")
    return errors


def _chat_errors(example: dict) -> list[str]:
    messages = example["messages"]
    if not isinstance(messages, list):
        return ["'messages' must be a list"]
    if not messages:
        return ["'messages' is empty"]
    errors: list[str] = []
    trainable_turns = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        errors.extend(_message_errors(message, where))
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if "weight" in message:
            weight = message["weight"]
            # bool is an int subclass; `true` is not a weight.
            if role != "assistant":
                errors.append(f"{where} has a 'weight' but only assistant messages take one")
            elif isinstance(weight, bool) or weight not in (0, 1):
                errors.append(f"{where} 'weight' must be 0 or 1, got {weight!r}")
        if role == "assistant" and message.get("weight", 1) != 0:
            trainable_turns += 1
    if trainable_turns == 0:
        errors.append("no trainable assistant turn (no assistant message, or all have weight 0)")
    return errors + tool_errors(example)


def _prompt_errors(example: dict) -> list[str]:
    """A reinforcement line: the conversation to answer (it ends with a non-assistant turn), never trained as
    given, so no message takes a 'weight'. The line's other keys are free: graders read them as ``item``."""
    errors: list[str] = []
    if "tools" in example or "functions" in example:
        errors.append("'tools' is not supported yet: prompts with tools cannot be trained")
    for i, message in enumerate(example["messages"]):
        errors.extend(_message_errors(message, f"messages[{i}]"))
        if isinstance(message, dict) and "weight" in message:
            errors.append(f"messages[{i}] has a 'weight': a prompt is context, its answer is sampled")
    return errors


def _preference_errors(example: dict) -> list[str]:
    """OpenAI's DPO line: ``input.messages`` (the context, never trained) and one assistant answer in each of
    ``preferred_output`` and ``non_preferred_output``."""
    missing = [key for key in PREFERENCE_KEYS if key not in example]
    if missing:
        return [f"missing {', '.join(repr(key) for key in missing)} (a preference example has "
                f"{', '.join(repr(key) for key in PREFERENCE_KEYS)})"]
    errors: list[str] = []
    context = example["input"]
    if not isinstance(context, dict):
        errors.append(f"'input' must be an object with 'messages', got {type(context).__name__}")
    elif "tools" in context or "functions" in context:
        errors.append("'input.tools' is not supported yet: preference data with tools cannot be trained")
    elif not isinstance(context.get("messages"), list) or not context["messages"]:
        errors.append("'input.messages' must be a non-empty list of messages")
    else:
        for i, message in enumerate(context["messages"]):
            errors.extend(_message_errors(message, f"input.messages[{i}]"))
            if isinstance(message, dict) and "weight" in message:
                errors.append(f"input.messages[{i}] has a 'weight': the input is context and never trained")
        last = context["messages"][-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            errors.append("'input.messages' ends with an assistant message: the outputs answer the last turn, "
                          "so it must be the user's (or a system or tool message)")
    answers = []
    for key in PREFERENCE_KEYS[1:]:
        output = example[key]
        if not isinstance(output, list) or len(output) != 1:
            errors.append(f"'{key}' must be a list holding one assistant message")
            continue
        message = output[0]
        message_errors = _message_errors(message, f"{key}[0]")
        errors.extend(message_errors)
        if isinstance(message, dict) and message.get("role", "assistant") != "assistant":
            errors.append(f"{key}[0] must have role 'assistant', got {message.get('role')!r}")
        if not message_errors:
            if not message["content"]:
                errors.append(f"{key}[0] 'content' is empty")
            answers.append(message["content"])
    if len(answers) == 2 and answers[0] == answers[1]:
        errors.append("'preferred_output' and 'non_preferred_output' are the same answer: nothing to prefer")
    return errors


def _completion_errors(example: dict) -> list[str]:
    errors = []
    for key in ("prompt", "completion"):
        if not isinstance(example[key], str):
            errors.append(f"'{key}' must be a string, got {type(example[key]).__name__}")
    if isinstance(example["completion"], str) and not example["completion"]:
        errors.append("'completion' is empty: there is nothing to train on")
    return errors


def _classification_errors(example: dict, *, pair: bool) -> list[str]:
    errors = []
    for key in ("text", "text_pair") if pair else ("text",):
        if not isinstance(example[key], str):
            errors.append(f"'{key}' must be a string, got {type(example[key]).__name__}")
    if "label" not in example:
        errors.append("missing 'label'")
    else:
        label = example["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            errors.append(f"'label' must be an integer class index, got {label!r}")
        elif label < 0:
            errors.append(f"'label' must be ≥ 0, got {label}")
    return errors


def validate_jsonl_line(line: bytes, line_number: int) -> tuple[Format | None, list[str]]:
    """Check one line of a JSONL training file.

    Returns the line's format (None when it cannot be told) and its problems, each prefixed with
    ``line N:``. ``line`` may carry its trailing newline.
    """

    def fail(message: str) -> tuple[None, list[str]]:
        return None, [f"line {line_number}: {message}"]

    line = line.rstrip(b"\r\n")
    if line_number == 1 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]  # a UTF-8 byte-order mark some editors write; not part of the JSON
    if not line.strip():
        return fail("blank line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return fail(f"not valid UTF-8 (byte {exc.start})")
    try:
        example = json.loads(text)
    except json.JSONDecodeError as exc:
        return fail(f"invalid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(example, dict):
        return fail(f"an example must be a JSON object, got {type(example).__name__}")
    try:
        fmt = detect_format(example)
    except DataError as exc:
        return fail(exc.message)
    return fmt, [f"line {line_number}: {problem}" for problem in validate_example(example, fmt)]


def _split_lines(raw: bytes) -> list[bytes]:
    lines = raw.split(b"\n")
    if lines and lines[-1].strip() == b"":
        lines.pop()  # the newline that ends the last line does not start a blank one
    return lines


def load_examples(path: str | Path) -> list[dict]:
    """Read a JSONL training file into a list of examples, all in one format.

    Raises DataError listing every bad line (with its number), when formats are mixed, or when the file
    holds no example.
    """
    raw = Path(path).read_bytes()
    lines = _split_lines(raw)
    errors: list[str] = []
    first_line_of: dict[str, int] = {}
    examples: list[dict] = []
    for number, line in enumerate(lines, start=1):
        fmt, line_errors = validate_jsonl_line(line, number)
        errors.extend(line_errors)
        if fmt is None or line_errors:
            continue
        first_line_of.setdefault(fmt, number)
        examples.append(json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8")))
    if len(first_line_of) > 1:
        found = ", ".join(f"{fmt} (first at line {n})" for fmt, n in first_line_of.items())
        errors.append(f"a file must use one format, found: {found}")
    if errors:
        raise _data_error(f"{Path(path).name} has {len(errors)} problem(s)", errors)
    if not examples:
        raise DataError(f"{Path(path).name} holds no example", errors=["the file is empty"])
    return examples


def check_examples(examples: list[dict], what: str = "training data") -> Format:
    """Validate an in-memory example list (same rules as a file) and return its one format."""
    if not examples:
        raise DataError(f"{what} holds no example", errors=["no examples"])
    errors: list[str] = []
    first_index_of: dict[str, int] = {}
    for index, example in enumerate(examples, start=1):
        try:
            fmt = detect_format(example)
        except DataError as exc:
            errors.append(f"example {index}: {exc.message}")
            continue
        first_index_of.setdefault(fmt, index)
        errors.extend(f"example {index}: {problem}" for problem in validate_example(example, fmt))
    if len(first_index_of) > 1:
        found = ", ".join(f"{fmt} (first at example {n})" for fmt, n in first_index_of.items())
        errors.append(f"{what} must use one format, found: {found}")
    if errors:
        raise _data_error(f"{what} has {len(errors)} problem(s)", errors)
    return next(iter(first_index_of))


def _data_error(summary: str, errors: list[str]) -> DataError:
    shown = errors[:_MAX_ERRORS_IN_MESSAGE]
    more = f"; and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return DataError(f"{summary}: " + "; ".join(shown) + more, errors=errors)
