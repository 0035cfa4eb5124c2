"""python -m deploy.serve --repository REPO: tritonserver in the foreground, stopped cleanly on SIGTERM.

The server is the `tritonserver` on PATH (NVIDIA's containers) or else the one from the pinned
nvidia-pytriton wheel in the env `python -m deploy.stub_env` built (`make triton-env`), with the
environment its Python-backend stub needs. SIGTERM and SIGINT are passed on: Triton stops taking
requests, finishes those in flight, and exits; this command exits with the server's status.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from common.cli import OneLineParser, run_cli
from common.errors import UsageError
from deploy.stub_env import default_env, read_record


def server_command(
    repository: Path,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    triton_env: Path | None = None,
    log_verbose: int = 0,
    exit_timeout_s: int = 300,
) -> tuple[list[str], dict]:
    """The tritonserver command line and its environment."""
    repository = Path(repository).expanduser().resolve()
    if not repository.is_dir() or not any(repository.glob("*/config.pbtxt")):
        raise UsageError(
            f"--repository {repository} holds no model (no */config.pbtxt); "
            "write one with `python -m deploy.triton --artifacts DIR --repository REPO`"
        )
    for flag, port in (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        if not 0 < port < 65536:
            raise UsageError(f"{flag} {port} is not a TCP port (1..65535)")
    env = dict(os.environ)
    # A unique shared-memory prefix: two servers on one host (tests, several models) must not share regions.
    arguments = [
        f"--model-repository={repository}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--disable-auto-complete-config",
        f"--log-verbose={log_verbose}",
        # On SIGTERM Triton waits this long for requests in flight (its default, 30 s, is shorter than an image).
        f"--exit-timeout-secs={exit_timeout_s}",
        f"--backend-config=python,shm-region-prefix-name=flux2_{os.getpid()}_",
    ]
    on_path = shutil.which("tritonserver")
    if on_path and triton_env is None:
        return [on_path, *arguments], env
    env_dir = Path(triton_env) if triton_env is not None else default_env()
    record = read_record(env_dir)
    if record is None or not Path(record["tritonserver"]).is_file():
        raise UsageError(
            f"no tritonserver on PATH and no Triton env in {env_dir}; build it with "
            f"`python -m deploy.stub_env --out {env_dir}` (make triton-env) or run in NVIDIA's Triton container"
        )
    library_path = [*record["library_path"], *filter(None, [env.get("LD_LIBRARY_PATH")])]
    env["LD_LIBRARY_PATH"] = ":".join(library_path)
    env["PATH"] = f"{record['bin']}:{env.get('PATH', '')}"
    env.pop("PYTHONHOME", None)
    command = [record["tritonserver"], *arguments, f"--backend-directory={record['backend_directory']}"]
    return command, env


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this process dies without forwarding one (no stray server)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(
    *, repository: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002, **options
) -> int:
    """Run tritonserver in the foreground, forwarding SIGTERM/SIGINT; `options` as `server_command`'s.

    `openai_port` (an option): also run the OpenAI images API there, in the same lifecycle (deploy/openai_front.py).
    """
    openai_port = options.pop("openai_port", None)
    ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    command, env = server_command(repository, **ports, **options)
    print(f"serving {repository}: http :{http_port}, grpc :{grpc_port}, metrics :{metrics_port}", file=sys.stderr)
    front = None
    if openai_port is not None:
        from deploy.openai_front import start_front

        # On the address Triton's endpoints listen on (all interfaces, Triton's default).
        front_options = {"host": "0.0.0.0", "exit_timeout_s": options.get("exit_timeout_s", 300)}
        front = start_front(repository=repository, triton_http_port=http_port, port=openai_port,
                            preexec_fn=_die_with_parent, **front_options)  # fmt: skip
    # Its own process group: a terminal's Ctrl-C reaches the server once, through `forward`.
    server = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent, process_group=0)

    def forward(signum, _frame):
        if front is not None:
            front.stop(signum, server)  # the front drains first, then the server (openai_front.py)
        elif server.poll() is None:
            server.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = server.wait() if front is None else front.wait_beside(server)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status if status >= 0 else 128 - status


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m deploy.serve", description="Run tritonserver on a model repository.")
    parser.add_argument("--repository", required=True, type=Path, help="written by `python -m deploy.triton`")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--triton-env",
        type=Path,
        default=None,
        help="env from `python -m deploy.stub_env` (default: tritonserver on PATH)",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level")
    parser.add_argument(
        "--openai-port",
        type=int,
        default=None,
        help="also serve OpenAI's images API on this port (docs/serving.md; needs the serve extra)",
    )
    parser.add_argument(
        "--exit-timeout-s", type=int, default=300, help="on SIGTERM, seconds for requests in flight (default 300)"
    )
    return serve(**vars(parser.parse_args(argv)))  # the flags are serve's keyword arguments


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
