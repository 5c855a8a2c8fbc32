"""The checkpoint's small non-weight files (tokenizer, generation config, ...), for workers
that cannot see the service's filesystem."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.deps import RegistryDep, require
from service.api.schemas import FileList, FileOut, problem_responses
from service.errors import ModelNotReady
from service.loading.files import file_path, list_files
from service.loading.pipeline import LoadedModel

router = APIRouter(prefix="/v1/models", tags=["files"])


def _loaded(registry: RegistryDep, model_id: str) -> LoadedModel:
    record = registry.get(model_id)
    if record.loaded is None:
        raise ModelNotReady(
            f"{model_id} is {record.state.value}; its files are served once it is ready "
            f"(GET /v1/models/{model_id})."
        )
    return record.loaded


@router.get(
    "/{model_id}/files",
    response_model=FileList,
    dependencies=[require("read")],
    responses=problem_responses(401, 403, 404, 409),
)
def list_model_files(model_id: str, registry: RegistryDep) -> FileList:
    """The tokenizer, special tokens, chat template, generation and model config files of
    the checkpoint (never weights), with sizes and SHA-256."""
    loaded = _loaded(registry, model_id)
    files = list_files(loaded.checkpoint, loaded.allowed)
    return FileList(
        model_id=model_id,
        revision=loaded.resolved_revision,
        files=[FileOut(name=f.name, size=f.size, sha256=f.sha256) for f in files],
    )


@router.get(
    "/{model_id}/files/{name:path}",
    response_class=FileResponse,
    dependencies=[require("read")],
    responses={
        200: {
            "content": {"application/json": {}, "text/plain": {}, "application/octet-stream": {}},
            "description": "The file: JSON, text, or bytes (a sentencepiece model)",
        },
        **problem_responses(401, 403, 404, 409),
    },
)
def get_model_file(model_id: str, name: str, registry: RegistryDep) -> FileResponse:
    """One of the files GET /v1/models/{id}/files lists."""
    loaded = _loaded(registry, model_id)
    path = file_path(loaded.checkpoint, loaded.allowed, name)
    guessed = mimetypes.guess_type(name)[0]
    media = guessed if guessed in ("application/json", "text/plain") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=name)
