"""python -m flux2_tiny --out DIR [--model tiny|tiny-klein|...] [--set NAME=VALUE ...]"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.atomic import atomic_dir
from flux2_tiny import TINY_MODELS, tiny_preset, writer_for
from flux2_tiny.config import DEFAULT, TinyConfig


def _parse_overrides(pairs: list[str], base: TinyConfig = DEFAULT) -> TinyConfig:
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"error: --set {pair!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        default = getattr(base, name)
        if isinstance(default, tuple):
            changes[name] = tuple(int(v) for v in raw.split(","))
        elif isinstance(default, bool):
            changes[name] = raw.lower() in ("1", "true", "yes")
        else:
            changes[name] = type(default)(raw)
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flux2_tiny",
        description="Write a tiny random FLUX.2 checkpoint (diffusers layout) for tests and demos.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to create (must not exist)")
    parser.add_argument(
        "--model", default="tiny", choices=TINY_MODELS, help="which family: [dev] (tiny) or [klein] (default tiny)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a config field")
    args = parser.parse_args(argv)
    config = _parse_overrides(args.set, tiny_preset(args.model))
    if args.out.exists():
        raise SystemExit(f"error: --out {args.out} already exists; choose a new folder")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(args.out) as staging:
        writer_for(config)(staging, config)
    print(f"wrote tiny FLUX.2 checkpoint {args.out} ({config.key()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
