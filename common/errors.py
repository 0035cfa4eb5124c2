"""One small error hierarchy. Every message says what failed, the value, and the fix."""

from __future__ import annotations


class Flux2TrtError(Exception):
    """A failure the user can act on: the command line prints it as one line and exits 2."""

    exit_code = 2


class CheckpointError(Flux2TrtError):
    """The checkpoint folder is missing, not FLUX.2, or holds unreadable weights."""


class ArtifactsError(Flux2TrtError):
    """An artifacts folder is missing, incomplete, or from an incompatible version."""


class UsageError(Flux2TrtError):
    """A command-line value is out of range or unknown."""


class VerificationError(Flux2TrtError):
    """An exported graph does not match PyTorch within the declared tolerance."""

    exit_code = 1


class EngineCompatibilityError(Flux2TrtError):
    """A graph uses something TensorRT's ONNX parser does not accept (engines.check)."""

    exit_code = 1


class StorageError(Flux2TrtError):
    """The disk refused a write: full, a file-size limit, an I/O error, or no permission."""


class NonFiniteError(Flux2TrtError):
    """A stage produced NaN or Inf: the weights are damaged or the arithmetic overflowed."""

    exit_code = 1


class InternalError(Exception):
    """A broken invariant of flux2-trt itself, not something the user can fix.

    Deliberately not a Flux2TrtError: `run_cli` lets it through with its traceback, which is what a
    bug report needs.
    """
