"""A warm pytest for mutation runs: one process imports the heavy third-party modules once, then forks a
fresh child per test command, so a mutant costs its tests and the import of fastlora itself, not the
~5 s (more on a loaded machine) of importing torch, torch._dynamo and Triton again.

    python mutation/forkserver.py serve SOCKET [MODULE ...]   # preload MODULEs (never fastlora), serve
    python mutation/forkserver.py run SOCKET -- PYTEST_ARGS   # one pytest run in a forked child;
                                                              # exit status = pytest's
    python mutation/forkserver.py run - -- PYTEST_ARGS        # no server: pytest in this process

Each child starts from the server's state (fastlora and the tests not imported), takes the client's working
directory and environment (cosmic-ray's PYTHONDONTWRITEBYTECODE included), and imports fastlora from the
(mutated) files on disk. When the client dies (cosmic-ray's per-mutant timeout kills it) the child is killed.
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile

_TAIL = 20000  # characters of the child's output sent back to the client


def _send(conn: socket.socket, payload: dict) -> None:
    data = json.dumps(payload).encode()
    conn.sendall(struct.pack("!I", len(data)) + data)


def _receive(conn: socket.socket) -> dict | None:
    header = _read_exactly(conn, 4)
    if header is None:
        return None
    body = _read_exactly(conn, struct.unpack("!I", header)[0])
    return None if body is None else json.loads(body)


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    chunks = b""
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return chunks


def _pytest_in_this_process(args: list[str]) -> int:
    import pytest

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``python -m pytest`` does
    return int(pytest.main(args))


def _child(request: dict, output_path: str) -> None:
    """In the forked child: take the client's directory and environment, run pytest, exit with its status."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
        with open(output_path, "w") as output:
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
        sys.argv = ["pytest", *request["args"]]
        status = _pytest_in_this_process(request["args"])
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - any failure to run the tests is a failed run
        import traceback

        traceback.print_exc()
        status = 99
    os._exit(status)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as file:
            return file.read()[-_TAIL:]
    except OSError:
        return ""


def _serve_one(conn: socket.socket) -> None:
    request = _receive(conn)
    if request is None:
        return
    handle, output_path = tempfile.mkstemp(prefix="forkserver-", suffix=".log")
    os.close(handle)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _child(request, output_path)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                _send(conn, {"status": code if code >= 0 else 128 - code, "output": _tail(output_path)})
                return
            readable, _, _ = select.select([conn], [], [], 0.05)
            if readable and not conn.recv(1, socket.MSG_PEEK):  # the client is gone (timed out): stop the run
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
    finally:
        os.unlink(output_path)


def serve(path: str, modules: list[str]) -> None:
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():  # as tests/conftest.py, before Triton is imported
            os.environ["TRITON_INTERPRET"] = "1"
    for name in modules:
        importlib.import_module(name)
    loaded = sorted(name for name in sys.modules if name == "fastlora" or name.startswith(("fastlora.", "tests")))
    if loaded:
        raise SystemExit(f"the server must not import the code under test, but it imported {loaded}")
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                _serve_one(conn)
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)


def run(path: str, args: list[str]) -> int:
    if path == "-":
        return _pytest_in_this_process(args)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    _send(client, {"args": args, "cwd": os.getcwd(), "env": dict(os.environ)})
    reply = _receive(client)
    if reply is None:
        print("forkserver: no reply (the server stopped)", file=sys.stderr)
        return 98
    sys.stdout.write(reply["output"])
    return int(reply["status"])


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(argv[1], argv[2:])
        return 0
    if len(argv) >= 3 and argv[0] == "run" and argv[2] == "--":
        return run(argv[1], argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
