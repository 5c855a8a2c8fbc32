"""Domain errors: each has a stable machine `code`, an HTTP status and a message that says
what to do next. One handler in `service.api.problems` turns them into problem+json."""

from __future__ import annotations


class BaseholdError(Exception):
    code = "internal"
    status = 500
    title = "Internal error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _error(name: str, code: str, status: int, title: str) -> type[BaseholdError]:
    cls = type(name, (BaseholdError,), {"code": code, "status": status, "title": title})
    cls.__doc__ = title
    return cls


InvalidSpec = _error("InvalidSpec", "invalid_spec", 400, "Invalid load specification")
NameTaken = _error("NameTaken", "name_taken", 409, "Name already taken")
ModelNotFound = _error("ModelNotFound", "model_not_found", 404, "Model not found")
ModelNotReady = _error("ModelNotReady", "model_not_ready", 409, "Model not ready")
ModelLeased = _error("ModelLeased", "model_leased", 409, "Model is leased")
NotShareable = _error("NotShareable", "not_shareable", 409, "Model cannot be shared")
LeaseNotFound = _error("LeaseNotFound", "lease_not_found", 404, "Lease not found")
SourceNotFound = _error("SourceNotFound", "source_not_found", 404, "Source not found")
SourceNotAllowed = _error("SourceNotAllowed", "source_not_allowed", 403, "Source not allowed")
GatedOrUnauthorized = _error(
    "GatedOrUnauthorized", "gated_or_unauthorized", 403, "Hub refused access"
)
RemoteCodeRefused = _error("RemoteCodeRefused", "remote_code_refused", 403, "Remote code refused")
WrongModelType = _error("WrongModelType", "wrong_model_type", 400, "Task does not fit checkpoint")
InvalidCheckpoint = _error("InvalidCheckpoint", "invalid_checkpoint", 400, "Invalid checkpoint")
InsufficientMemory = _error("InsufficientMemory", "insufficient_memory", 507, "Insufficient memory")
OutOfMemory = _error("OutOfMemory", "out_of_memory", 507, "Out of memory during load")
Unauthorized = _error("Unauthorized", "unauthorized", 401, "Unauthorized")
Forbidden = _error("Forbidden", "forbidden", 403, "Forbidden")
LoadCancelled = _error("LoadCancelled", "load_cancelled", 409, "Load cancelled")
