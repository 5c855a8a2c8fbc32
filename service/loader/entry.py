"""The loader process's entry point, run in the child the template forked. Torch-free
here, so the serving process can name it; the loader side it runs is already imported in
the template."""

from __future__ import annotations

import importlib
import socket

from service.common.protocol.job import Job
from service.common.protocol.messages import Kind


def run(kind: Kind, sock: socket.socket, job: Job) -> None:
    child = importlib.import_module("service.loader.child")
    child.main(kind, sock, job)
