"""Command-line plumbing shared by every `__main__`: one-line errors and exit codes."""

from __future__ import annotations

import argparse
import sys

from common.errors import Flux2TrtError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake prints one line (not usage + error) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main, argv=None) -> int:
    """Call `main(argv)`; turn a Flux2TrtError into `error: ...` on stderr and its exit code."""
    try:
        return int(main(argv) or 0)
    except Flux2TrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing partial was kept", file=sys.stderr)
        return 130


def parse_csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_int_csv(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in parse_csv(text))
    except ValueError:
        parser.error(f"{flag} {text!r} must be comma-separated integers, e.g. 10,20,30")
