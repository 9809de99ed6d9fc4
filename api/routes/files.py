"""`/v1/files`: upload (streamed and validated), list, retrieve, delete, download."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from api.deps import CurrentOrg, SessionDep, SettingsDep, StorageDep, UploadRateLimit
from api.schemas import FileDeleted, FilePublic, FilesPublic
from api.services import files as files_service

router = APIRouter(prefix="/files", tags=["files"])


# A plain `def`: FastAPI runs it in a worker thread, where reading the spooled upload and validating
# it line by line does not hold up the event loop.
@router.post("", dependencies=[UploadRateLimit])
def upload_file(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    org_id: CurrentOrg,
    file: Annotated[UploadFile, File(description="JSONL, one training example per line.")],
    purpose: Annotated[str, Form(description='"fine-tune"')],
) -> FilePublic:
    created = files_service.create_file(
        session, storage, settings, org_id=org_id, filename=file.filename, purpose=purpose, stream=file.file
    )
    return FilePublic.from_row(created)


@router.get("")
def list_files(
    session: SessionDep,
    org_id: CurrentOrg,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    order: Literal["asc", "desc"] = "desc",
) -> FilesPublic:
    page = files_service.list_files(session, org_id, purpose=purpose, after=after, limit=limit, order=order)
    return FilesPublic.of([FilePublic.from_row(f) for f in page.items], page.has_more)


@router.get("/{file_id}")
def retrieve_file(session: SessionDep, org_id: CurrentOrg, file_id: str) -> FilePublic:
    return FilePublic.from_row(files_service.get_file(session, org_id, file_id))


@router.delete("/{file_id}")
def delete_file(session: SessionDep, storage: StorageDep, org_id: CurrentOrg, file_id: str) -> FileDeleted:
    deleted = files_service.delete_file(session, storage, org_id, file_id)
    return FileDeleted(id=deleted.id)


@router.get("/{file_id}/content", response_class=FileResponse)
def download_file_content(session: SessionDep, storage: StorageDep, org_id: CurrentOrg, file_id: str) -> FileResponse:
    # FileResponse streams from disk in chunks and encodes the filename safely (RFC 6266 filename*).
    file, path = files_service.file_content_path(session, storage, org_id, file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=file.filename)
