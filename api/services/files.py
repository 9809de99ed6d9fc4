"""Uploaded files: streaming an upload into the store while validating it line by line, listing, reading,
deleting, and vetting a file for use by a fine-tuning job.

A file exists only as a pair: the stored content and its row. Content is written to a `.part` file,
renamed into place, then the row is committed; any failure on the way removes what was written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.core.errors import (
    InsufficientStorage,
    InvalidParameter,
    InvalidStateTransition,
    InvalidTrainingFile,
    NotFound,
    PayloadTooLarge,
)
from api.core.gc_pauses import freeze_long_lived
from api.core.ids import new_id
from api.core.job_states import UNFINISHED
from api.core.settings import Settings
from api.core.storage import Storage
from api.core.tables import File, Job
from api.services.pagination import Order, Page, paginate

UPLOAD_PURPOSES = ("fine-tune",)

# (line bytes, 1-based line number) -> (format or None, messages prefixed "line N:"); svfit_core.training.data's.
LineValidator = Callable[[bytes, int], tuple[str | None, list[str]]]


def default_line_validator() -> LineValidator:
    # Imported on use: the training library pulls in torch, which the API should not pay for at start-up.
    from svfit_core.training.data import validate_jsonl_line

    freeze_long_lived("training library")
    return validate_jsonl_line


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(line: bytes) -> bool:
    """Whether a line that parsed holds a string with half a surrogate pair (only then is it re-parsed)."""
    try:
        json.dumps(json.loads(line.decode("utf-8-sig")), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except ValueError:  # the validator accepted it, so this does not happen; never fail the upload on it
        return False
    return False


# A reported problem quotes the line's values (a label, a role, its keys); a hostile line must not turn
# status_details into megabytes.
MAX_PROBLEM_CHARS = 300


@dataclass
class ValidationReport:
    data_format: str | None = None
    num_examples: int = 0
    error_count: int = 0
    errors: list[str] = field(default_factory=list)
    stopped_at_line: int | None = None  # checking gave up here, after too many problems

    def status_details(self) -> str:
        if not self.error_count:
            return f"{self.num_examples} examples, {self.data_format} format."
        lines = [f"{self.error_count} problem(s) found; the file cannot be used for fine-tuning.", *self.errors]
        if self.error_count > len(self.errors):
            lines.append(f"... and {self.error_count - len(self.errors)} more.")
        if self.stopped_at_line is not None:
            lines.append(f"Checking stopped at line {self.stopped_at_line}; later lines were not checked.")
        return "\n".join(lines)


class TrainingDataCheck:
    """Checks JSONL as it streams past, one complete line at a time.

    Memory is bounded by `max_line_bytes`: a longer line is dropped as it streams and reported, never
    buffered. Time is linear in the upload (a line's pieces are joined once, at its newline), and once
    `max_errors` problems are found the rest of the file is no longer parsed, so a hostile upload of
    millions of junk lines costs no more than storing it. The per-line schema is the training library's;
    what only the whole file can tell (one format throughout, at least one example) is checked here.
    """

    def __init__(
        self,
        validate_line: LineValidator,
        max_reported_errors: int,
        *,
        max_line_bytes: int = 16 * 1024 * 1024,
        max_errors: int = 1000,
    ):
        self._validate_line = validate_line
        self._max_reported_errors = max_reported_errors
        self._max_line_bytes = max_line_bytes
        self._max_errors = max_errors
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._overlong = False  # the current line passed max_line_bytes; its bytes are dropped until its newline
        self._line_number = 0
        self._format_line = 0
        self.report = ValidationReport()

    @property
    def stopped(self) -> bool:
        return self.report.stopped_at_line is not None

    def feed(self, chunk: bytes) -> None:
        for i, piece in enumerate(chunk.split(b"\n")):
            if self.stopped:
                return
            if i:  # a newline came before this piece: the line held so far is complete
                self._end_line()
            self._hold(piece)

    def finish(self) -> ValidationReport:
        # What follows the last newline is a line only if it holds something (as in load_examples).
        if not self.stopped and (self._overlong or b"".join(self._pending).strip()):
            self._end_line()
        self._pending, self._pending_bytes, self._overlong = [], 0, False
        if self.report.num_examples == 0 and self.report.error_count == 0:
            self._error("the file has no examples (one JSON object per line expected)")
        return self.report

    def _hold(self, piece: bytes) -> None:
        if self._overlong or not piece:
            return
        self._pending_bytes += len(piece)
        if self._pending_bytes > self._max_line_bytes:
            self._overlong, self._pending = True, []
        else:
            self._pending.append(piece)

    def _end_line(self) -> None:
        line, overlong = b"".join(self._pending), self._overlong
        self._pending, self._pending_bytes, self._overlong = [], 0, False
        self._line_number += 1
        if overlong:
            self._error(f"line {self._line_number}: longer than the limit of {self._max_line_bytes} bytes per line")
        else:
            self._check_line(line)
        if self.report.error_count >= self._max_errors:
            self.report.stopped_at_line = self._line_number

    def _error(self, message: str) -> None:
        self.report.error_count += 1
        if len(self.report.errors) < self._max_reported_errors:
            if len(message) > MAX_PROBLEM_CHARS:
                message = message[: MAX_PROBLEM_CHARS - 3] + "..."
            self.report.errors.append(message)

    def _validate(self, line: bytes) -> tuple[str | None, list[str]]:
        n = self._line_number
        try:
            line_format, messages = self._validate_line(line, n)
        except RecursionError:  # json.loads of `[[[[…` thousands deep
            return None, [f"line {n}: invalid JSON: nested too deeply"]
        except ValueError as exc:  # json.loads of an integer with more than 4,300 digits, among others
            return None, [f"line {n}: invalid JSON: {exc}"]
        if not messages and _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(line):
            # JSON lets `"\ud83d"` stand alone; Python parses it, but no tokenizer can encode it, so the
            # job would fail at its first batch. Refused here, where the line number is known.
            return None, [f"line {n}: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"]
        return line_format, messages

    def _check_line(self, line: bytes) -> None:
        # Blank lines go to the validator too: training loads files with the same rules, so a file
        # that passes here never fails to load there.
        line_format, messages = self._validate(line)
        for message in messages:  # each already starts with "line N:"
            self._error(message)
        if messages or line_format is None:
            return
        if self.report.data_format is None:
            self.report.data_format, self._format_line = line_format, self._line_number
        elif line_format != self.report.data_format:
            self._error(
                f"line {self._line_number}: a {line_format} example, but the file's examples are "
                f"{self.report.data_format} (from line {self._format_line}); a file mixes no formats"
            )
            return
        self.report.num_examples += 1


_UNSAFE_FILENAME_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def clean_filename(filename: str | None) -> str:
    """The last path component, without control characters: it is echoed back and sent in headers."""
    name = PureWindowsPath(PurePosixPath(filename or "").name).name
    name = _UNSAFE_FILENAME_CHARS.sub("", name).strip()[:255]
    # "." and ".." survive `.name`; never a path here, but a client saving the download by name would
    # get a directory's name.
    return name if name.strip(".") else "upload.jsonl"


def create_file(
    session: Session,
    storage: Storage,
    settings: Settings,
    *,
    org_id: str,
    filename: str | None,
    purpose: str,
    stream: BinaryIO,
    validate_line: LineValidator | None = None,
) -> File:
    """Stream `stream` into the store (size-limited), validate it on the way, and record the file."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidParameter(
            f"'{purpose}' is not a supported purpose; expected one of: {', '.join(UPLOAD_PURPOSES)}.", param="purpose"
        )
    check = TrainingDataCheck(
        validate_line or default_line_validator(),
        settings.max_reported_line_errors,
        max_line_bytes=settings.max_line_bytes,
        max_errors=settings.max_line_errors,
    )
    file_id = new_id("file")
    key = f"files/{org_id}/{file_id}.jsonl"
    digest = hashlib.sha256()
    size = 0
    try:
        with storage.part_path(key).open("wb") as out:
            while chunk := stream.read(settings.upload_chunk_bytes):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"The file exceeds the upload limit of {settings.max_upload_bytes} bytes.", param="file"
                    )
                out.write(chunk)
                digest.update(chunk)
                check.feed(chunk)
        report = check.finish()
        storage.commit(key)
        file = File(
            id=file_id,
            org_id=org_id,
            filename=clean_filename(filename),
            purpose=purpose,
            bytes=size,
            status="error" if report.error_count else "processed",
            status_details=report.status_details(),
            data_format=report.data_format,
            num_examples=report.num_examples,
            storage_key=key,
            sha256=digest.hexdigest(),
        )
        session.add(file)
        session.commit()
    except BaseException as exc:
        session.rollback()
        storage.delete(key)  # removes the .part as well as a committed file
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(
                "The file store is out of space, so the upload was not saved. Try again once space is freed.",
                param="file",
            ) from exc
        raise
    return file


def get_file(session: Session, org_id: str, file_id: str) -> File:
    file = session.scalar(select(File).where(File.id == file_id, File.org_id == org_id))
    if file is None:
        raise NotFound(f"No such File object: {file_id}")
    return file


def list_files(
    session: Session, org_id: str, *, purpose: str | None, after: str | None, limit: int, order: Order
) -> Page[File]:
    filters = [File.org_id == org_id]
    if purpose is not None:
        filters.append(File.purpose == purpose)
    return paginate(session, File, *filters, after=after, limit=limit, order=order)


def file_content_path(session: Session, storage: Storage, org_id: str, file_id: str) -> tuple[File, Path]:
    file = get_file(session, org_id, file_id)
    path = storage.path(file.storage_key)
    if not path.is_file():
        raise NotFound(f"The content of file {file_id} is no longer available.")
    return file, path


def delete_file(session: Session, storage: Storage, org_id: str, file_id: str) -> File:
    """Row first, then content: a crash in between leaves an orphan blob, never a row without content."""
    file = get_file(session, org_id, file_id)
    in_use_by = session.scalar(
        select(Job.id).where(
            Job.org_id == org_id,
            or_(Job.training_file == file_id, Job.validation_file == file_id),
            Job.status.in_(UNFINISHED),
        )
    )
    if in_use_by is not None:
        raise InvalidStateTransition(
            f"File {file_id} is used by fine-tuning job {in_use_by}, which has not finished.", param="file_id"
        )
    storage_key = file.storage_key
    session.delete(file)
    session.commit()
    storage.delete(storage_key)
    return file


def usable_training_file(
    session: Session, org_id: str, file_id: str, *, param: str, min_examples: int = 1
) -> File:
    """The file a job will train (or validate) on, or a 400 naming `param`. Another org's id is "no such file"."""
    file = session.scalar(select(File).where(File.id == file_id, File.org_id == org_id))
    if file is None:
        raise InvalidTrainingFile(f"File '{file_id}' does not exist.", param=param)
    if file.purpose != "fine-tune":
        raise InvalidTrainingFile(f"File '{file_id}' has purpose '{file.purpose}', not 'fine-tune'.", param=param)
    if file.status != "processed":
        details = (file.status_details or "").split("\n")
        raise InvalidTrainingFile(
            f"File '{file_id}' failed validation and cannot be used: {'; '.join(details[:4])}", param=param
        )
    if (file.num_examples or 0) < min_examples:
        raise InvalidTrainingFile(
            f"File '{file_id}' has {file.num_examples or 0} examples; at least {min_examples} are required.",
            param=param,
        )
    return file
