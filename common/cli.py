"""Command-line plumbing shared by every `__main__`: one-line errors, exit codes, signals, disk faults."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from common.errors import Flux2TrtError
from common.staging import remove_in_progress
from common.storage import is_storage_error, storage_error


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake prints one line (not usage + error) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


INTERRUPTED = "partial files and staging folders were removed, finished outputs kept"


def _abort(signum, frame):
    """Ctrl-C or SIGTERM: remove what is being written, say so in one line, exit 128 + the signal.

    Not by raising KeyboardInterrupt through the stack: raised while torch traced a graph, it ended
    the exporter by SIGSEGV (exit -11) or SIGINT (exit -2) in 2 of ~20 tries, skipping every cleanup;
    this way, 0 of 16 (tests/test_faults.py, signal 1 s into an export).
    The atomic writers register what they write (`common.staging.track`); that list is removed here.
    """
    remove_in_progress()
    sys.stdout.flush()
    print(f"\nerror: interrupted ({signal.Signals(signum).name}); {INTERRUPTED}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def run_cli(main, argv=None) -> int:
    """Call `main(argv)`; turn what can go wrong into one line on stderr and an exit code.

    A Flux2TrtError exits with its own code; a disk that refuses a write (full, file-size limit,
    I/O error, no permission) with 2; Ctrl-C with 130 and SIGTERM with 143 (128 + the signal), after
    removing what was partial (`_abort`). Anything else is a bug and keeps its traceback.
    """
    try:
        previous = {signum: signal.signal(signum, _abort) for signum in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (an embedding host): its own signal handling stands
        previous = {}
    try:
        return int(main(argv) or 0)
    except Flux2TrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # where no handler could be set: the `finally` blocks have run
        print(f"error: interrupted (SIGINT); {INTERRUPTED}", file=sys.stderr)
        return 130
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        error = storage_error(exc, "writing", exc.filename)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def one_of(names, what: str):
    """An argparse `type` accepting one of `names`; anything else fails naming the value and every choice.

    Used with `choices=names` (so --help lists them): the type runs first, so the error is this
    one line, "unknown precision 'fp9'; choose one of fp32, fp16, bf16, fp8", not argparse's quoted list.
    """
    names = tuple(names)

    def check(value: str) -> str:
        if value not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; choose one of {', '.join(names)}")
        return value

    check.__name__ = what  # argparse names the type in some messages
    return check


def parse_csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_int_csv(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in parse_csv(text))
    except ValueError:
        parser.error(f"{flag} {text!r} must be comma-separated integers, e.g. 10,20,30")
