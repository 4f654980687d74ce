"""Run `internvl-engine serve` as a child process on a free loopback port (tests, `bench_serving.py --spawn`)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


@dataclass
class SpawnedServer:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path  # the server's stdout and stderr

    def log_tail(self, size: int = 4000) -> str:
        return self.log_path.read_bytes()[-size:].decode(errors="replace")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def spawned_server(serve_args: Sequence[str], timeout_s: float = 300.0, host: str = "127.0.0.1",
                   env: dict[str, str] | None = None, python: Sequence[str] = (sys.executable,)
                   ) -> Iterator[SpawnedServer]:
    """Starts the server with `serve_args` on a free port, yields once /health answers 200, stops it after
    (SIGTERM, then SIGKILL after 15 s). RuntimeError with the server's output if it exits or stays unhealthy.
    `python`: the interpreter command (a wrapper that sets resource limits first, in the reliability tests)."""
    port = free_port(host)
    command = [*python, "-m", "internvl_engine.cli", "serve", "--host", host, "--port", str(port), *serve_args]
    log_fd, log_name = tempfile.mkstemp(prefix="internvl-serve-", suffix=".log")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                               env=env if env is not None else dict(os.environ))
    os.close(log_fd)
    server = SpawnedServer(f"http://{host}:{port}", process, Path(log_name))
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(server.base_url):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout_s:g} s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        server.log_path.unlink(missing_ok=True)
