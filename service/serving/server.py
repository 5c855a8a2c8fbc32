"""uvicorn, with SIGTERM as the normal way to stop."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI


class DrainingServer(uvicorn.Server):
    """On SIGTERM (the orchestrator's stop) drain, unload every model, and exit 0 instead of
    re-raising the signal after shutdown as plain uvicorn does."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def serve(app: FastAPI, host: str, port: int, log_level: str) -> None:
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30
    )
    DrainingServer(config).run()
