"""A tritonserver on this machine for tests and benchmarks: free ports, bounded waits, no stray process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from deploy.http_proxy import loopback_ports
from deploy.serve import processes_mentioning

# Ports the kernel reports free now on loopback (held open together, so they are distinct).
free_ports = loopback_ports


class LocalServer:
    """`python -m deploy.serve` as a child process; `start()` returns once /v2/health/ready says 200.

    `openai`: also the OpenAI front (`--openai-port`), and `start()` waits for its /health too.
    """

    def __init__(
        self, repository: Path, *, triton_env: Path | None = None, log_path: Path | None = None, openai: bool = False
    ):
        self.repository = Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port, self.openai_port = free_ports(4)
        self.openai = openai
        self.triton_env = triton_env
        self.log_path = Path(log_path or self.repository.with_name(self.repository.name + ".log"))
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _get(self, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def metrics(self) -> str:
        return self._get(self.metrics_port, "/metrics")[1]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 180.0) -> LocalServer:
        command = [sys.executable, "-m", "deploy.serve", "--repository", str(self.repository)]
        command += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        command += ["--metrics-port", str(self.metrics_port)]
        if self.triton_env is not None:
            command += ["--triton-env", str(self.triton_env)]
        if self.openai:
            command += ["--openai-port", str(self.openai_port)]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = "\n".join(self.log().splitlines()[-15:])
                raise RuntimeError(f"tritonserver exited with {self.process.returncode} before ready:\n{tail}")
            try:
                ready = self._get(self.http_port, "/v2/health/ready", timeout=2.0)[0] == 200
                # Triton's metrics service can answer after its HTTP readiness (CI once read a refused
                # metrics port right after start): ready means every endpoint a caller uses answers.
                ready = ready and self._get(self.metrics_port, "/metrics", timeout=2.0)[0] == 200
                if ready and (not self.openai or self._get(self.openai_port, "/health", timeout=2.0)[0] == 200):
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s; log: {self.log_path}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful: requests in flight finish), then SIGKILL after `timeout_s`; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.returncode = self.process.returncode
        # The server runs in its own process group; if it outlived deploy.serve, end it (and only it).
        deadline = time.monotonic() + 10
        while processes_mentioning(str(self.repository)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in processes_mentioning(f"--model-repository={self.repository}"):
            os.kill(pid, signal.SIGKILL)
        return self.returncode

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
