"""python -m runtime.verify DIR: every artifact file re-hashed against its manifest, for a deployment pipeline.

Exit 0 when all match (the verified stamp is refreshed, so the next start trusts them without
hashing); exit 2 with one line naming the first damaged or missing file otherwise. TensorRT plans
under DIR/engines/<target> are checked against that target's engine manifest when there are any.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common.cli import OneLineParser, run_cli


def verify(*, artifacts: Path, log=None) -> dict[str, int]:
    """Re-hash every file of `artifacts` (and its engines); return {relative path: bytes} of those checked."""
    from common.engine_manifest import build_command, engines_dir, read_engine_manifest, targets_with_engines
    from common.integrity import verify_artifacts, verify_files
    from common.manifest import read_manifest

    log = log or (lambda message: print(message, file=sys.stderr))
    folder = Path(artifacts).expanduser()
    manifest = read_manifest(folder)
    verify_artifacts(folder, manifest, force=True)
    checked = {name: (folder / name).stat().st_size for name in manifest.files()}
    for target in targets_with_engines(folder):
        plans_dir = engines_dir(folder, target)
        # A present but unreadable or malformed engine manifest is refused here: one line, exit 2.
        engines = read_engine_manifest(folder, target).engines
        plans = {f"{plans_dir.relative_to(folder)}/{record.plan}": record.plan_sha256 for record in engines.values()}
        fix = f"rebuild them (`{build_command(folder, target)} --force`)"
        verify_files(folder, plans, force=True, fix=fix)
        checked.update({name: (folder / name).stat().st_size for name in plans})
    return checked


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m runtime.verify", description="Check every artifact file against its manifest's sha256."
    )
    parser.add_argument("artifacts", type=Path, help="artifacts folder written by `python -m export`")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    checked = verify(artifacts=args.artifacts)
    seconds = time.perf_counter() - started
    print(
        f"verified {len(checked)} files, {sum(checked.values()) / 2**20:.1f} MiB, in {args.artifacts} "
        f"against the manifest's sha256 ({seconds:.1f} s): all match"
    )
    return 0


def cli() -> None:
    """The console script: user errors as one line and an exit code, as `python -m` gives them."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
