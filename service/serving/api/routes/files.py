"""The checkpoint's small non-weight files (tokenizer, generation config, ...), for workers
that cannot see the service's filesystem."""

from __future__ import annotations

import mimetypes
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import Response

from service.common.errors import ModelNotReady
from service.common.protocol.held import Held
from service.serving.api.deps import RegistryDep, require
from service.serving.api.schemas import FileList, FileOut, problem_responses
from service.serving.files import list_files, read_file

router = APIRouter(prefix="/v1/models", tags=["files"])


def _loaded(registry: RegistryDep, model_id: str) -> Held:
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
    response_class=Response,
    dependencies=[require("read")],
    responses={
        200: {
            "content": {"application/json": {}, "text/plain": {}, "application/octet-stream": {}},
            "description": "The file: JSON, text, or bytes (a sentencepiece model)",
        },
        **problem_responses(401, 403, 404, 409),
    },
)
def get_model_file(model_id: str, name: str, registry: RegistryDep) -> Response:
    """One of the files GET /v1/models/{id}/files lists."""
    loaded = _loaded(registry, model_id)
    data = read_file(loaded.checkpoint, loaded.allowed, name)  # the bytes that were checked
    guessed = mimetypes.guess_type(name)[0]
    media = guessed if guessed in ("application/json", "text/plain") else "application/octet-stream"
    disposition = f"attachment; filename*=utf-8''{quote(name)}"
    return Response(data, media_type=media, headers={"Content-Disposition": disposition})
