"""Uploaded files: streaming an upload into the store while validating it line by line, listing, reading,
deleting, and vetting a file for use by a fine-tuning job.

A file exists only as a pair: the stored content and its row. Content is written to a `.part` file,
renamed into place, then the row is committed; any failure on the way removes what was written.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.core.errors import (
    InvalidParameter,
    InvalidStateTransition,
    InvalidTrainingFile,
    NotFound,
    PayloadTooLarge,
)
from api.core.ids import new_id
from api.core.settings import Settings
from api.core.storage import LocalStorage
from api.core.tables import File, Job
from api.services.pagination import Order, Page, paginate

UPLOAD_PURPOSES = ("fine-tune",)
UNFINISHED_JOB_STATUSES = ("validating_files", "queued", "running", "paused")

# (line bytes, 1-based line number) -> (format or None, messages prefixed "line N:"); svfit_core.data's.
LineValidator = Callable[[bytes, int], tuple[str | None, list[str]]]


def default_line_validator() -> LineValidator:
    # Imported on use: the training library pulls in torch, which the API should not pay for at start-up.
    from svfit_core.data import validate_jsonl_line

    return validate_jsonl_line


@dataclass
class ValidationReport:
    data_format: str | None = None
    num_examples: int = 0
    error_count: int = 0
    errors: list[str] = field(default_factory=list)

    def status_details(self) -> str:
        if not self.error_count:
            return f"{self.num_examples} examples, {self.data_format} format."
        lines = [f"{self.error_count} problem(s) found; the file cannot be used for fine-tuning.", *self.errors]
        if self.error_count > len(self.errors):
            lines.append(f"... and {self.error_count - len(self.errors)} more.")
        return "\n".join(lines)


class TrainingDataCheck:
    """Checks JSONL as it streams past, one complete line at a time, so memory is bounded by one line.

    The per-line schema is the training library's; what only the whole file can tell (one format
    throughout, at least one example) is checked here.
    """

    def __init__(self, validate_line: LineValidator, max_reported_errors: int):
        self._validate_line = validate_line
        self._max_reported_errors = max_reported_errors
        self._pending = b""
        self._line_number = 0
        self._format_line = 0
        self.report = ValidationReport()

    def feed(self, chunk: bytes) -> None:
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._check_line(line)

    def finish(self) -> ValidationReport:
        # What follows the last newline is a line only if it holds something (as in load_examples).
        if self._pending.strip():
            self._check_line(self._pending)
        self._pending = b""
        if self.report.num_examples == 0 and self.report.error_count == 0:
            self._error("the file has no examples (one JSON object per line expected)")
        return self.report

    def _error(self, message: str) -> None:
        self.report.error_count += 1
        if len(self.report.errors) < self._max_reported_errors:
            self.report.errors.append(message)

    def _check_line(self, line: bytes) -> None:
        # Blank lines go to the validator too: training loads files with the same rules, so a file
        # that passes here never fails to load there.
        self._line_number += 1
        line_format, messages = self._validate_line(line, self._line_number)
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
    return name or "upload.jsonl"


def create_file(
    session: Session,
    storage: LocalStorage,
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
    check = TrainingDataCheck(validate_line or default_line_validator(), settings.max_reported_line_errors)
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
    except BaseException:
        session.rollback()
        storage.delete(key)  # removes the .part as well as a committed file
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


def file_content_path(session: Session, storage: LocalStorage, org_id: str, file_id: str) -> tuple[File, Path]:
    file = get_file(session, org_id, file_id)
    path = storage.path(file.storage_key)
    if not path.is_file():
        raise NotFound(f"The content of file {file_id} is no longer available.")
    return file, path


def delete_file(session: Session, storage: LocalStorage, org_id: str, file_id: str) -> File:
    """Row first, then content: a crash in between leaves an orphan blob, never a row without content."""
    file = get_file(session, org_id, file_id)
    in_use_by = session.scalar(
        select(Job.id).where(
            Job.org_id == org_id,
            or_(Job.training_file == file_id, Job.validation_file == file_id),
            Job.status.in_(UNFINISHED_JOB_STATUSES),
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
