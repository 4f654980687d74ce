"""Start `internvl-engine serve` as a real process on loopback for the server tests, and read its /metrics."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from internvl_engine.server.spawn import spawned_server


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value} (comments dropped)."""
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=30) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            match = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
            if match.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")


@contextmanager
def running_server(*args: str, timeout_s: float = 180.0) -> Iterator[Server]:
    with spawned_server(["--backend", "torch", "--log-level", "warning", *args], timeout_s) as spawned:
        yield Server(spawned.base_url, spawned.process)


def data_url(image: Image.Image | bytes, fmt: str = "PNG") -> str:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        image = buffer.getvalue()
    mime = "jpeg" if fmt.upper() == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(image).decode()


def post_json(url: str, body: bytes | dict, api_key: str | None = None, timeout_s: float = 120.0) -> tuple[int, dict]:
    """POST without the openai client (raw bodies, error statuses): (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
