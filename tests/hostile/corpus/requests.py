"""Upload requests that are wrong as requests (no file, bad purpose, not multipart, over the size limit,
broken multipart) and uploads whose filename is hostile.

The first kind must be answered 4xx in the error envelope with nothing stored; the second is accepted, and
the filename is cleaned for display and never becomes part of a storage path. Bodies are built by hand
(`multipart`) where an HTTP client would refuse to send them or would escape what we want to send raw.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

BOUNDARY = "hostileboundary7MA4YWxkTrZu0gW"
MB = 1024 * 1024


def good_body(n: int = 5) -> bytes:
    return b"".join(json.dumps({"text": f"t{i}", "label": i % 2}).encode() + b"\n" for i in range(n))


def part(name: str, value: bytes, *, filename: bytes | None = None, content_type: bytes | None = None) -> bytes:
    """One multipart part, headers written byte for byte (a filename is not escaped)."""
    disposition = b'form-data; name="' + name.encode() + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    headers = b"Content-Disposition: " + disposition + b"\r\n"
    if content_type is not None:
        headers += b"Content-Type: " + content_type + b"\r\n"
    return b"--" + BOUNDARY.encode() + b"\r\n" + headers + b"\r\n" + value + b"\r\n"


def multipart(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def upload_body(filename: bytes, body: bytes | None = None, purpose: bytes = b"fine-tune") -> bytes:
    return multipart(
        part("purpose", purpose),
        part("file", good_body() if body is None else body, filename=filename, content_type=b"application/jsonl"),
    )


@dataclass(frozen=True)
class RequestCase:
    """A POST /v1/files answered `status` with error `code` naming `param`, leaving nothing behind."""

    name: str
    body: Callable[[], bytes]
    content_type: str | None
    status: int
    code: str
    param: str | None
    settings: dict = field(default_factory=dict)
    extra_headers: dict = field(default_factory=dict)
    chunked: bool = False  # sent without a Content-Length, in pieces


def _mp(*parts: bytes, close: bool = True) -> Callable[[], bytes]:
    return lambda: multipart(*parts, close=close)


REQUEST_CASES: list[RequestCase] = [
    RequestCase("no_file_part", _mp(part("purpose", b"fine-tune")), MULTIPART, 400, "missing_parameter", "file"),
    RequestCase("no_purpose", _mp(part("file", good_body(), filename=b"a.jsonl")), MULTIPART, 400,
                "missing_parameter", "purpose"),
    RequestCase("wrong_purpose", lambda: upload_body(b"a.jsonl", purpose=b"assistants"), MULTIPART, 400,
                "invalid_parameter", "purpose"),
    # An empty form field is no field to FastAPI: "missing", still naming `purpose`.
    RequestCase("empty_purpose", lambda: upload_body(b"a.jsonl", purpose=b""), MULTIPART, 400,
                "missing_parameter", "purpose"),
    RequestCase("purpose_with_nul", lambda: upload_body(b"a.jsonl", purpose=b"fine-tune\x00"), MULTIPART, 400,
                "invalid_parameter", "purpose"),
    RequestCase("file_as_plain_field", _mp(part("purpose", b"fine-tune"), part("file", good_body())), MULTIPART,
                400, "invalid_parameter", "file"),
    RequestCase("empty_multipart", _mp(), MULTIPART, 400, "missing_parameter", "file"),
    RequestCase("json_body", lambda: json.dumps({"purpose": "fine-tune", "file": "x"}).encode(), "application/json",
                400, "missing_parameter", "file"),
    RequestCase("text_plain_body", good_body, "text/plain", 400, "missing_parameter", "file"),
    RequestCase("no_content_type", good_body, None, 400, "missing_parameter", "file"),
    RequestCase("multipart_without_boundary", lambda: upload_body(b"a.jsonl"), "multipart/form-data", 400,
                "invalid_request", None),
    RequestCase("multipart_wrong_boundary", lambda: upload_body(b"a.jsonl"),
                "multipart/form-data; boundary=somethingelse", 400, "invalid_request", None),
    RequestCase("multipart_garbage", lambda: b"\x00\xff" * 1000, MULTIPART, 400, "invalid_request", None),
    RequestCase("multipart_unterminated", _mp(part("purpose", b"fine-tune"), close=False), MULTIPART, 400,
                "missing_parameter", "file"),
    RequestCase("huge_filename_header", lambda: upload_body(b"a" * 200_000 + b".jsonl"), MULTIPART, 400,
                "invalid_request", None),
    RequestCase("over_size_limit_streamed", lambda: upload_body(b"big.jsonl", good_body(2000)), MULTIPART, 413,
                "file_too_large", "file", settings={"max_upload_bytes": 20_000}),
    RequestCase("over_size_limit_declared", lambda: b"x" * 10, MULTIPART, 413, "file_too_large", "file",
                settings={"max_upload_bytes": 1000}, extra_headers={"Content-Length": str(10**12)}),
    # No Content-Length: cut off as it streams, far beyond the limit (the multipart envelope allowance is 64 KB).
    RequestCase("over_size_limit_chunked", lambda: upload_body(b"big.jsonl", good_body(40_000)), MULTIPART, 413,
                "file_too_large", "file", settings={"max_upload_bytes": 20_000}, chunked=True),
]


@dataclass(frozen=True)
class FilenameCase:
    """An upload named `filename` (raw bytes in the part header): stored as `shown` says, if at all."""

    name: str
    filename: bytes
    shown: str  # what FileObject.filename reports


FILENAME_CASES: list[FilenameCase] = [
    FilenameCase("posix_traversal", b"../../../../etc/passwd", "passwd"),
    FilenameCase("windows_traversal", b"..\\..\\windows\\system32\\evil.jsonl", "evil.jsonl"),
    FilenameCase("absolute_path", b"/var/lib/svfit/store/files/x.jsonl", "x.jsonl"),
    FilenameCase("dot_dot_only", b"..", "upload.jsonl"),
    FilenameCase("control_chars", b"a\x01b\x1b[31mc\x7f.jsonl", "ab[31mc.jsonl"),
    FilenameCase("nul_byte", b"good.jsonl\x00.sh", "good.jsonl.sh"),
    FilenameCase("quotes_and_semicolons", b'a\\"; filename=evil.sh; x=\\".jsonl', 'a"; filename=evil.sh; x=".jsonl'),
    FilenameCase("long_name", b"n" * 1000 + b".jsonl", "n" * 255),
    FilenameCase("unicode", "données 📊 ü.jsonl".encode(), "données 📊 ü.jsonl"),
    FilenameCase("empty", b"", "upload.jsonl"),
]
