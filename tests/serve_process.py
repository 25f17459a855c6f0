"""The real `nanopali serve` in a subprocess on a free loopback port, for the server and browser tests."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
KEY = "test-key-5b1c"


def data_url(path_or_bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat_body(prompt: str, image_url: str, **options) -> dict:
    return {"model": "nanopali-default", "temperature": 0, **options, "messages": [{"role": "user", "content": [
        {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": image_url}}]}]}


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: list[str]):
        self.process, self.url, self.log = process, url, log

    def get(self, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=_auth(key), timeout=60, **kwargs)

    def post(self, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={**_auth(key), **kwargs.pop("headers", {})}, timeout=60, **kwargs)

    def metric(self, name: str, key: str | None = KEY) -> float:
        """The value of one metric line (its name with labels, as Prometheus prints it); 0 if absent."""
        found = re.search(rf"^{re.escape(name)} (\S+)$", self.get("/metrics", key=key).text, re.M)
        return float(found.group(1)) if found else 0.0


def _auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


@contextmanager
def running_server(*args: str, env: dict | None = None, ready_s: float = 120):
    """Start `nanopali serve --port 0 ARGS` (the default model, one torch thread: the CPU is shared) with `env`
    added to the environment, wait until /health says ready, yield a Server, stop it at the end."""
    command = [sys.executable, "-m", "nanopali", "serve", "--port", "0", "--threads", "1", "--log-level", "warning",
               *args]
    env = {**{k: v for k, v in os.environ.items() if k != "NANOPALI_API_KEY"}, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    log: list[str] = []
    found = threading.Event()

    def drain():
        for line in process.stderr:
            log.append(line)
            found.set() if "nanopali: serving" in line else None
    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + ready_s
        while not found.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + "".join(log))
        url = re.search(r"on (http://\S+)", "".join(log)).group(1)
        server = Server(process, url, log)
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready:\n" + "".join(log))
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
