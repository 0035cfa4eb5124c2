"""python -m deploy.serve --repository REPO: tritonserver in the foreground, stopped cleanly on SIGTERM.

The server is the `tritonserver` on PATH (NVIDIA's containers) or else the one from the pinned
nvidia-pytriton wheel in the env `python -m deploy.stub_env` built (`make triton-env`), with the
environment its Python-backend stub needs. SIGTERM and SIGINT are passed on: Triton stops taking
requests, finishes those in flight, and exits; this command exits with the server's status.

It owns what the server starts: however tritonserver ends (a clean exit, a crash, kill -9), the
Python-backend stubs it launched for this command's shared-memory prefix are stopped and their
`/dev/shm/flux2_<pid>_*` regions removed (a stub orphaned mid-request ignores SIGTERM and holds its
model's memory for minutes, measured on tritonserver 2.51), and a server that did not exit 0 gets
one line saying how it ended. A port already in use is refused before the server starts (exit 2).

It listens on loopback (127.0.0.1) unless told otherwise: tritonserver's own default is every
interface, which exposes an unauthenticated endpoint to the network. `--host 0.0.0.0` (the
container's CMD) binds all interfaces.

The HTTP and metrics ports are this process's (deploy/http_proxy.py): it forwards them to Triton's,
which listen on loopback ports of their own, and counts the 503s clients receive
(`flux2_requests_rejected_total`: Triton 2.51 counts no queue-full rejection). gRPC is Triton's.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.cli import OneLineParser, run_cli
from common.errors import UsageError
from deploy.http_proxy import CountingProxy, loopback_ports
from deploy.stub_env import default_env, read_record

DEFAULT_HOST = "127.0.0.1"
LOOPBACK = "127.0.0.1"  # where Triton's own HTTP and metrics listen, behind deploy.serve's (http_proxy.py)


def check_host(host: str) -> str:
    """An IPv4 address for tritonserver to bind; UsageError otherwise.

    IPv4 only: Triton's HTTP front (libevhtp) reads a plain address with inet_addr, so a host name or
    an IPv6 literal would not bind there.
    """
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise UsageError(
            f"--host {host!r} is not an IPv4 address; pass 127.0.0.1 (this machine only, the default) "
            "or 0.0.0.0 (every interface)"
        ) from None


def server_command(
    repository: Path,
    *,
    host: str = DEFAULT_HOST,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    triton_env: Path | None = None,
    log_verbose: int = 0,
    exit_timeout_s: int = 300,
) -> tuple[list[str], dict]:
    """The tritonserver command line and its environment: gRPC binds `host`, HTTP and metrics loopback.

    deploy.serve's proxy serves HTTP and metrics on `host` and forwards them to these ports (http_proxy.py).
    """
    host = check_host(host)
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
    # A unique shared-memory prefix: two servers on one host (tests, several models) must not share
    # regions; it also names this server's stubs and /dev/shm files for the clean-up (`leftovers`).
    arguments = [
        f"--model-repository={repository}",
        f"--http-address={LOOPBACK}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={LOOPBACK}",
        f"--metrics-port={metrics_port}",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--disable-auto-complete-config",
        f"--log-verbose={log_verbose}",
        # On SIGTERM Triton waits this long for requests in flight (its default, 30 s, is shorter than an image).
        f"--exit-timeout-secs={exit_timeout_s}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix()}",
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


def shm_prefix(pid: int | None = None) -> str:
    """The Python backend's shared-memory prefix of the server this process starts."""
    return f"flux2_{os.getpid() if pid is None else pid}_"


SHM_DIR = Path("/dev/shm")


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (Linux /proc): a server or stub left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(int(entry.name))
    return found


def leftovers(prefix: str) -> tuple[list[int], list[Path]]:
    """The stubs (their command line names the region prefix) and /dev/shm files of one server."""
    files = sorted(SHM_DIR.glob(prefix + "*")) if SHM_DIR.is_dir() else []
    return processes_mentioning(prefix), files


def clean_up(prefix: str, wait_s: float = 5.0) -> tuple[int, int]:
    """Stop the stubs the server left (SIGKILL: an orphaned stub ignores SIGTERM) and remove its shared
    memory; returns (stubs stopped, files removed)."""
    stubs, _ = leftovers(prefix)
    for pid in stubs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while leftovers(prefix)[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    _, files = leftovers(prefix)
    for path in files:
        path.unlink(missing_ok=True)
    return len(stubs), len(files)


def check_ports_free(ports: dict[str, int]) -> None:
    """Refuse a port something already listens on, before the server starts (it would exit, leaving files)."""
    for flag, port in ports.items():
        if not 0 < port < 65536:
            raise UsageError(f"{flag} {port} is not a TCP port (1..65535)")
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as exc:
                raise UsageError(
                    f"{flag} {port} is already in use on this host ({exc.strerror}); stop what holds it or choose "
                    f"another port with {flag}"
                ) from None


def ending(status: int, stopped: int, removed: int, note: str | None = None) -> str | None:
    """One line on how the server ended, where it did not exit 0; None for a clean exit."""
    if status == 0:
        return None
    how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
    return (
        f"tritonserver {how}; stopped {stopped} Python-backend stub(s) it left and removed {removed} shared-memory "
        f"file(s){'; ' + note if note else ''} (its log above says more)"
    )


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this process dies without forwarding one (no stray server)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(
    *,
    repository: Path,
    host: str = DEFAULT_HOST,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    **options,
) -> int:
    """Run tritonserver in the foreground, forwarding SIGTERM/SIGINT; `options` as `server_command`'s.

    `openai_port` (an option): also run the OpenAI images API there, in the same lifecycle (deploy/openai_front.py).
    """
    openai_port = options.pop("openai_port", None)
    ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    check_ports_free({"--" + name.replace("_", "-"): port for name, port in ports.items()}
                     | ({"--openai-port": openai_port} if openai_port is not None else {}))  # fmt: skip
    triton_ports = loopback_ports(2)  # Triton's own HTTP and metrics, behind the counting proxy
    command, env = server_command(repository, host=host, http_port=triton_ports[0], grpc_port=grpc_port,
                                  metrics_port=triton_ports[1], **options)  # fmt: skip
    models = sorted(path.parent.name for path in Path(repository).expanduser().glob("*/config.pbtxt"))
    proxy = CountingProxy(host=host, ports=(http_port, metrics_port), triton_ports=triton_ports, models=models)
    print(
        f"serving {repository}: http {host}:{http_port}, grpc {host}:{grpc_port}, metrics {host}:{metrics_port} "
        f"(Triton's http and metrics on {LOOPBACK}:{triton_ports[0]}, {triton_ports[1]}, 503s counted)",
        file=sys.stderr,
    )
    proxy.start()
    front = None
    if openai_port is not None:
        from deploy.openai_front import start_front

        # On the address Triton's endpoints listen on; it reaches Triton on loopback where Triton listens there.
        triton_host = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host
        front_options = {"host": host, "triton_host": triton_host, "exit_timeout_s": options.get("exit_timeout_s", 300)}
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
        proxy.close()  # Triton has ended: pass on the answers it gave, then stop listening
        stopped, removed = clean_up(shm_prefix())
    line = None if front is not None and front.reported else ending(status, stopped, removed, front and front.note)
    if line:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return status if status >= 0 else 128 - status


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m deploy.serve", description="Run tritonserver on a model repository.")
    parser.add_argument("--repository", required=True, type=Path, help="written by `python -m deploy.triton`")
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"IPv4 address HTTP, gRPC and metrics bind (default {DEFAULT_HOST}; 0.0.0.0: every interface)",
    )
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
