"""The OpenAI front (`python -m deploy.openai_api`) as deploy.serve's second child, in tritonserver's lifecycle.

- Started beside tritonserver by `deploy.serve --openai-port PORT`, in its own process group (a
  terminal's Ctrl-C reaches it once, through deploy.serve) and with the parent-death signal set.
- SIGTERM/SIGINT to deploy.serve: the front first (uvicorn stops taking requests and finishes those
  in flight, which Triton is still serving), then tritonserver (it drains what its own clients sent).
- Either one ending on its own stops the other, one line says which, and deploy.serve exits non-zero.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.errors import UsageError

POLL_S = 0.2


def _signal_name(status: int) -> str:
    return f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with {status}"


class Front:
    """The front's process and what deploy.serve's signal handler asked of it."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.stopping: int | None = None  # the signal deploy.serve received, once it did
        self.reported = False  # the front's end was said in one line here
        self.note: str | None = None  # for deploy.serve's line on how tritonserver ended

    def stop(self, signum: int, server: subprocess.Popen) -> None:
        """From the signal handler: SIGTERM the front (graceful); a second signal goes to the server at once."""
        if self.stopping is not None and server.poll() is None:
            server.send_signal(signum)
        self.stopping = signum
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_beside(self, server: subprocess.Popen, *, front_timeout_s: float = 330.0) -> int:
        """Wait for both processes; returns deploy.serve's status (negative: the server's signal, as Popen's)."""
        while self.process.poll() is None and server.poll() is None:
            time.sleep(POLL_S)
        if self.process.poll() is not None:  # the front ended first: drained, or died
            front_status = self.process.returncode
            if self.stopping is None:
                print(f"error: the OpenAI front {_signal_name(front_status)}; stopping tritonserver", file=sys.stderr)
                self.reported = True  # deploy.serve adds no line of its own
            if server.poll() is None:
                server.send_signal(self.stopping or signal.SIGTERM)
            server_status = server.wait()
        else:  # tritonserver ended first: the front has nothing to forward to
            server_status = server.returncode
            self.process.send_signal(signal.SIGTERM)
            try:
                front_status = self.process.wait(timeout=front_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                front_status = self.process.wait()
            # deploy.serve's one line on how tritonserver ended says so (`serve.ending`)
            self.note = "the OpenAI front was stopped"
        if self.stopping is None:  # nobody asked either to stop: never a success
            return server_status or front_status or 1
        # Asked to stop: the server's status; the front's only if it failed otherwise than by the signal.
        return server_status or (0 if front_status in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else front_status)


def start_front(
    *,
    repository: Path,
    triton_http_port: int,
    port: int,
    host: str,
    triton_host: str = "127.0.0.1",
    exit_timeout_s: int = 300,
    preexec_fn=None,
) -> Front:
    """`python -m deploy.openai_api` on HOST:PORT, forwarding to Triton's HTTP endpoint on this machine."""
    if not 0 < port < 65536:
        raise UsageError(f"--openai-port {port} is not a TCP port (1..65535)")
    missing = [name for name in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"--openai-port needs {', '.join(missing)} (FastAPI, uvicorn, python-multipart): "
            "pip install 'flux2-trt[serve]'"
        )
    command = [sys.executable, "-m", "deploy.openai_api", "--repository", str(Path(repository).resolve())]
    command += ["--triton-url", f"{triton_host}:{triton_http_port}", "--host", host, "--port", str(port)]
    command += ["--graceful-timeout-s", str(exit_timeout_s)]
    return Front(subprocess.Popen(command, preexec_fn=preexec_fn, process_group=0))
