"""Domain errors: each has a stable machine `code`, an HTTP status and a message that says
what to do next. One handler in `service.serving.api.problems` turns them into problem+json."""

from __future__ import annotations


class BaseholdError(Exception):
    code = "internal"
    status = 500
    title = "Internal error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def extra(self) -> dict[str, object]:
        """Members the problem+json body carries besides the standard ones."""
        return {}


class InvalidSpec(BaseholdError):
    code = "invalid_spec"
    status = 400
    title = "Invalid load specification"


class NameTaken(BaseholdError):
    code = "name_taken"
    status = 409
    title = "Name already taken"


class ModelNotFound(BaseholdError):
    code = "model_not_found"
    status = 404
    title = "Model not found"


class ModelNotReady(BaseholdError):
    code = "model_not_ready"
    status = 409
    title = "Model not ready"


class ModelLeased(BaseholdError):
    code = "model_leased"
    status = 409
    title = "Model is leased"


class NotShareable(BaseholdError):
    code = "not_shareable"
    status = 409
    title = "Model cannot be shared"


class LeaseNotFound(BaseholdError):
    code = "lease_not_found"
    status = 404
    title = "Lease not found"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason

    def extra(self) -> dict[str, object]:
        return {"reason": self.reason}


class SourceNotFound(BaseholdError):
    code = "source_not_found"
    status = 404
    title = "Source not found"


class SourceNotAllowed(BaseholdError):
    code = "source_not_allowed"
    status = 403
    title = "Source not allowed"


class GatedOrUnauthorized(BaseholdError):
    code = "gated_or_unauthorized"
    status = 403
    title = "Hub refused access"


class RemoteCodeRefused(BaseholdError):
    code = "remote_code_refused"
    status = 403
    title = "Remote code refused"


class WrongModelType(BaseholdError):
    code = "wrong_model_type"
    status = 400
    title = "Task does not fit checkpoint"


class InvalidCheckpoint(BaseholdError):
    code = "invalid_checkpoint"
    status = 400
    title = "Invalid checkpoint"


class InsufficientMemory(BaseholdError):
    code = "insufficient_memory"
    status = 507
    title = "Insufficient memory"


class InsufficientStorage(BaseholdError):
    code = "insufficient_storage"
    status = 507
    title = "Insufficient disk space for the download"


class DownloadFailed(BaseholdError):
    code = "download_failed"
    status = 502
    title = "The hub download failed"


class OutOfMemory(BaseholdError):
    code = "out_of_memory"
    status = 507
    title = "Out of memory during load"


class Unauthorized(BaseholdError):
    code = "unauthorized"
    status = 401
    title = "Unauthorized"


class Forbidden(BaseholdError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class LoadCancelled(BaseholdError):
    code = "load_cancelled"
    status = 409
    title = "Load cancelled"


class LeaseForbidden(BaseholdError):
    code = "lease_forbidden"
    status = 403
    title = "Lease secret required"


class TooManyLeases(BaseholdError):
    code = "too_many_leases"
    status = 429
    title = "Too many leases"


class TooManyRequests(BaseholdError):
    code = "too_many_requests"
    status = 429
    title = "Too many requests"


class FileNotFound(BaseholdError):
    code = "file_not_found"
    status = 404
    title = "File not found"


class LoaderCrashed(BaseholdError):
    code = "loader_crashed"
    status = 500
    title = "Loader process died"


class LoaderStalled(BaseholdError):
    code = "loader_stalled"
    status = 504
    title = "Loader process stalled"


class LoaderUnavailable(BaseholdError):
    code = "loader_unavailable"
    status = 503
    title = "Loader template unavailable"


class InvalidPath(BaseholdError):
    code = "invalid_path"
    status = 400
    title = "Invalid path"


def relayed(code: str, message: str, status: int) -> BaseholdError:
    """An error a loader process reported (its class stays there): same code and status."""
    for kind in _by_code():
        if kind.code == code:
            return kind(message)
    error = BaseholdError(message)
    error.code, error.status = code, status
    return error


def _by_code() -> list[type[BaseholdError]]:
    found: list[type[BaseholdError]] = []
    pending = list(BaseholdError.__subclasses__())
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return found
