"""python -m deploy.stub_env --out DIR: a tritonserver for machines without NVIDIA's container.

NGC's Triton containers put `tritonserver` on PATH; everywhere else (CI, a laptop) this builds one
from the pinned `nvidia-pytriton` wheel, which carries a tritonserver 2.51 binary, its Python
backend and a stub per Python version. Measured here, the stub needs three things:

- `libpython3.11.so` of the interpreter it runs (it links the library by name: another patch
  release's library, e.g. Debian's 3.11.2 under pyenv's 3.11.7, fails inside multiprocessing):
  LD_LIBRARY_PATH starts with the interpreter's own LIBDIR;
- numpy < 2 (its pybind11 2.10 garbles string tensors under numpy 2: `unpack_from requires a
  buffer of ...`), while flux2-trt itself needs numpy >= 2 elsewhere;
- its packages through `python3` on PATH (the embedded interpreter finds its prefix there; it
  does not read PYTHONPATH).

So DIR is a small venv holding the wheel and numpy 1.x (deploy/triton-env.txt) with a .pth file
that appends the installing interpreter's site-packages behind its own: the stub sees numpy 1.x
first and torch, onnxruntime, tokenizers and flux2-trt from the project's environment, without a
second copy of them. DIR/flux2-triton.json records what `python -m deploy.serve` needs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from common.atomic import atomic_dir
from common.cli import OneLineParser, run_cli
from common.errors import UsageError

REQUIREMENTS = Path(__file__).with_name("triton-env.txt")
RECORD = "flux2-triton.json"
PTH = "zz_flux2_trt_host.pth"  # sorts after the env's own .pth files


def default_env() -> Path:
    """`$FLUX2_TRT_TRITON_ENV`, else a sibling of this interpreter's environment: .venv -> .venv-triton."""
    import os

    configured = os.environ.get("FLUX2_TRT_TRITON_ENV")
    if configured:
        return Path(configured).expanduser()
    prefix = Path(sys.prefix)
    return prefix.with_name(prefix.name + "-triton")


def read_record(env: Path) -> dict | None:
    path = Path(env) / RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _requirements_hash() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def _project_root() -> Path | None:
    """The checkout holding these packages, when they are not installed into site-packages."""
    root = Path(__file__).resolve().parent.parent
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    return None if root == purelib else root


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"{what} failed ({last}); see `{' '.join(command)}`")
    return result.stdout


def build_env(out: Path, *, log=print) -> dict:
    """Create or refresh the env in `out`; returns its record. Reuses an env whose requirements match."""
    out = Path(out).expanduser().resolve()
    record = read_record(out)
    if record and record.get("requirements_sha256") == _requirements_hash() and Path(record["tritonserver"]).is_file():
        _write_pth(out, record)
        log(f"triton env {out} is up to date")
        return record
    if out.exists() and not (out / "pyvenv.cfg").is_file():
        raise UsageError(f"--out {out} exists and is not a virtual environment; choose another folder or remove it")
    base_python = getattr(sys, "_base_executable", sys.executable)
    log(f"creating {out} from {base_python} (nvidia-pytriton, numpy 1.x)")
    _run([base_python, "-m", "venv", str(out)], "creating the venv")
    python = out / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], f"pip install -r {REQUIREMENTS}")
    probe = (
        "import json, sys, sysconfig, pathlib, pytriton;"
        "root = pathlib.Path(pytriton.__file__).parent;"
        "print(json.dumps({'purelib': sysconfig.get_paths()['purelib'], 'libdir': sysconfig.get_config_var('LIBDIR'),"
        "'version': f'{sys.version_info[0]}.{sys.version_info[1]}', 'pytriton': str(root)}))"
    )
    facts = json.loads(_run([str(python), "-c", probe], "inspecting the env"))
    pytriton = Path(facts["pytriton"])
    dist = pytriton / "tritonserver"
    stub = dist / "python_backend_stubs" / facts["version"] / "triton_python_backend_stub"
    if not stub.is_file():
        raise UsageError(f"nvidia-pytriton has no Python-backend stub for Python {facts['version']} ({stub})")
    # The Python backend looks for its stub beside itself: assemble a backends folder as pytriton does.
    backends = out / "triton-backends"
    _assemble_backends(dist / "backends", stub, backends)
    record = {
        "requirements_sha256": _requirements_hash(),
        "tritonserver": str(dist / "bin" / "tritonserver"),
        "backend_directory": str(backends),
        "library_path": [facts["libdir"], str(Path(facts["purelib"]) / "nvidia_pytriton.libs")],
        "bin": str(out / "bin"),
        "purelib": facts["purelib"],
    }
    _write_pth(out, record)
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"triton env ready: {record['tritonserver']}")
    return record


def _assemble_backends(source: Path, stub: Path, backends: Path) -> None:
    """`source` (the wheel's backends) with `stub` in its python backend, replacing `backends` atomically:
    an interrupted refresh leaves the previous folder, never a python backend without its stub."""
    with atomic_dir(backends) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")


def _write_pth(out: Path, record: dict) -> None:
    """Behind the env's numpy 1.x: this interpreter's packages (and the checkout, when not installed)."""
    lines = []
    root = _project_root()
    if root is not None:  # before the host's packages, so an editable install elsewhere does not win
        lines.append(f"import sys; sys.path.insert(0, {str(root)!r})")
    for site in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        lines.append(f"import site; site.addsitedir({site!r})")
    (Path(record["purelib"]) / PTH).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m deploy.stub_env", description="Build the tritonserver environment from the pinned wheel."
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder (default: $FLUX2_TRT_TRITON_ENV or <venv>-triton)"
    )
    args = parser.parse_args(argv)
    build_env(args.out or default_env())
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
