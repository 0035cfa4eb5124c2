"""Command-line plumbing shared by every `__main__`: one-line errors, exit codes, signals, disk faults."""

from __future__ import annotations

import argparse
import signal
import sys

from common.errors import Flux2TrtError
from common.storage import is_storage_error, storage_error


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake prints one line (not usage + error) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` (staging folders, temporary files) runs."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def run_cli(main, argv=None) -> int:
    """Call `main(argv)`; turn what can go wrong into one line on stderr and an exit code.

    A Flux2TrtError exits with its own code; a disk that refuses a write (full, file-size limit,
    I/O error, no permission) with 2; Ctrl-C with 130 and SIGTERM with 143 (128 + the signal), after
    the atomic writers have removed what was partial. Anything else is a bug and keeps its traceback.
    """
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (an embedding host): its own SIGTERM handling stands
        previous = None
    try:
        return int(main(argv) or 0)
    except Flux2TrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(
            f"error: interrupted ({signal.Signals(signum).name}); partial files and staging folders were removed, "
            "finished outputs kept",
            file=sys.stderr,
        )
        return 128 + signum
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        error = storage_error(exc, "writing", exc.filename)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def parse_csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_int_csv(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in parse_csv(text))
    except ValueError:
        parser.error(f"{flag} {text!r} must be comma-separated integers, e.g. 10,20,30")
