"""Upload bodies that arrive as a well-formed request but hold bad (or odd but fine) training data.

The contract (shared/API.md, api/services/files.py): the upload is accepted as a file whose `status` is
"error" and whose `status_details` lists each problem with its line number; such a file cannot train a
job. Odd-but-valid bodies (a BOM on line 1, CRLF, duplicate keys, a surrogate pair) are "processed".
Small bodies are files under `files/`; big ones are built by `generated.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.hostile.corpus import generated

FILES_DIR = Path(__file__).parent / "files"
MB = 1024 * 1024


@dataclass(frozen=True)
class ContentCase:
    name: str
    body: Callable[[], bytes]
    status: str  # the file's status: "error" or "processed"
    details: tuple[str, ...] = ()  # substrings status_details must hold ("line 2:", the problem)
    settings: dict = field(default_factory=dict)  # overrides for this case's app
    max_seconds: float | None = None  # a bound on the upload's time, where time is the point


def _file(name: str) -> Callable[[], bytes]:
    return lambda: (FILES_DIR / name).read_bytes()


def _case(name: str, status: str, *details: str, **kwargs) -> ContentCase:  # noqa: ANN003
    return ContentCase(name, _file(f"{name}.jsonl"), status, details, **kwargs)


# The big cases need an upload limit above 50 MB and realistic chunks (the suite's default is 4 KB).
_BIG = {"max_upload_bytes": 64 * MB, "upload_chunk_bytes": MB}

CONTENT_CASES: list[ContentCase] = [
    _case("invalid_json", "error", "line 2:", "invalid JSON"),
    _case("truncated_json", "error", "line 3:", "invalid JSON"),
    _case("trailing_comma", "error", "line 2:", "invalid JSON"),
    _case("single_quotes", "error", "line 2:", "invalid JSON"),
    _case("latin1", "error", "line 2:", "not valid UTF-8"),
    _case("utf16_le_bom", "error", "line 1:", "not valid UTF-8"),
    _case("utf16_be", "error", "line 1:", "invalid JSON"),  # ASCII as UTF-16 is NUL-laced valid UTF-8
    _case("utf8_bom_mid_file", "error", "line 3:", "invalid JSON"),
    _case("overlong_utf8", "error", "line 2:", "not valid UTF-8"),
    _case("nul_in_string", "error", "line 2:", "invalid JSON"),
    _case("nul_bytes_line", "error", "line 2:", "invalid JSON"),
    _case("control_chars", "error", "line 2:", "invalid JSON"),
    _case("lone_surrogate", "error", "line 2:", "lone UTF-16 surrogate"),
    _case("mixed_formats", "error", "line 3:", "mixes no formats", "line 4:"),
    _case("wrong_types", "error", "line 2:", "'text' must be a string", "line 3:"),
    _case("missing_fields", "error", "line 2:", "missing 'label'"),
    _case("chat_missing_content", "error", "line 2:", "has no 'content'"),
    _case("chat_unknown_role", "error", "line 2:", "unknown role"),
    _case("chat_empty_messages", "error", "line 2:", "'messages' is empty"),
    _case("chat_messages_not_list", "error", "line 2:", "'messages' must be a list"),
    _case("unknown_keys", "error", "line 1:", "unknown format"),
    _case("json_array_line", "error", "line 2:", "must be a JSON object"),
    _case("json_scalars", "error", "line 1:", "line 4:", "must be a JSON object"),
    _case("negative_label", "error", "line 2:", "'label' must be"),
    _case("blank_line_inside", "error", "line 2:", "blank line"),
    _case("whitespace_only", "error", "line 1:", "blank line"),
    _case("empty", "error", "no examples"),
    # Odd but valid: each must be processed, so the strictness above is not a blanket refusal.
    _case("utf8_bom_first_line", "processed"),
    _case("crlf", "processed"),
    _case("duplicate_keys", "processed"),
    _case("surrogate_pair", "processed"),
    # Generated.
    ContentCase("fifty_mb_single_line", generated.fifty_mb_single_line, "error",
                ("line 1:", "longer than the limit"), settings=_BIG, max_seconds=60),
    ContentCase("two_million_empty_objects", generated.two_million_empty_objects, "error",
                ("line 1:", "unknown format", "Checking stopped at line 1000"), settings=_BIG, max_seconds=20),
    ContentCase("two_million_blank_lines", generated.two_million_blank_lines, "error",
                ("line 1:", "blank line", "Checking stopped"), settings=_BIG, max_seconds=20),
    ContentCase("two_million_junk_examples", generated.two_million_junk_examples, "error",
                ("line 1:", "'text' must be a string", "Checking stopped"), settings=_BIG, max_seconds=30),
    ContentCase("deeply_nested_array", generated.deeply_nested_array, "error", ("line 1:", "nested too deeply")),
    ContentCase("deeply_nested_value", generated.deeply_nested_value, "error", ("line 2:", "nested too deeply")),
    ContentCase("huge_integer_label", generated.huge_integer_label, "error", ("line 2:", "invalid JSON")),
    ContentCase("hundred_thousand_keys", generated.hundred_thousand_keys, "error", ("line 1:", "unknown format"),
                settings=_BIG),
    ContentCase("megabyte_label", generated.megabyte_label, "error", ("line 1:", "'label' must be"), settings=_BIG),
    ContentCase("valid_then_junk_tail", generated.valid_then_junk_tail, "error", ("line 6:", "invalid JSON")),
]
