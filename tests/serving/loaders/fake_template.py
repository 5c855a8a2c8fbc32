"""A stand-in for a loader template that should not be trusted, run as its own process:
`python tests/serving/loaders/fake_template.py SOCKET RECORD UID ANSWER`.

It binds SOCKET, then (UID not "-") becomes that uid before it listens, so SO_PEERCRED
names it; it writes "<connect>" to RECORD for each connection and then every byte it
receives, which is how the tests see that no job or token reached it. ANSWER says how it
answers a hello: "echo" (as a template of the asker's protocol would), a protocol number,
or "silent" (never). It prints "ready" once it listens.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading


def _serve(conn: socket.socket, record: int, answer: str) -> None:
    data = b""
    answered = False
    while True:
        try:
            chunk = conn.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            conn.close()
            return
        os.write(record, chunk)
        data += chunk
        if answered or answer == "silent" or len(data) < 4:
            continue
        (length,) = struct.unpack("!I", data[:4])
        if len(data) < 4 + length:
            continue
        try:
            hello = json.loads(data[4 : 4 + length])
        except ValueError:
            continue
        if answer != "echo":
            hello["protocol"] = int(answer)
        body = json.dumps(hello).encode()
        conn.sendall(struct.pack("!I", len(body)) + body)
        answered = True


def main(path: str, record_path: str, uid: str, answer: str) -> None:
    record = os.open(record_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    if uid != "-":
        os.setgroups([])
        os.setgid(int(uid))
        os.setuid(int(uid))
    listener.listen(16)  # the peer credentials are this process's as of now
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        os.write(record, b"<connect>")
        threading.Thread(target=_serve, args=(conn, record, answer), daemon=True).start()


if __name__ == "__main__":
    main(*sys.argv[1:5])
