"""Emulator workers as real processes, for tests that kill one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


@contextlib.contextmanager
def decode_emulator(model: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A decode emulator in its own process (so a test can kill it): its URL and process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "tandem.workers.emulator", "--role", "decode", "--port", str(port),
         "--served-model-name", model, "--log-level", "warning"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "the emulator exited"
            assert time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(5)
