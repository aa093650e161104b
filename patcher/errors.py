"""Exceptions a user can act on. The CLI prints their message as one line and exits with
the exception's `exit_code`: 2 for bad input, 1 when the input was fine but the result
falls short (the same code as a failed verification gate)."""

import errno
import re

# What a user can act on, for the I/O errors that a disk or a mount causes.
_IO_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class PatcherError(Exception):
    """Bad input: a missing file, an invalid spec, a patch for another model, and so on."""

    exit_code = 2


class ErasureIncomplete(PatcherError):
    """The edit could not erase every forget fact: the result, not the input, is at fault."""

    exit_code = 1


def quoted(text: str, limit: int = 60) -> str:
    """`text` quoted for a one-line message, cut to `limit` characters (a spec's prompt may be pages long)."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def io_cause(err: OSError) -> str:
    """An OSError's cause in words a user can act on (no space, read-only, permission)."""
    return _IO_CAUSES.get(err.errno, err.strerror or str(err).splitlines()[0])


def io_error_message(err: OSError) -> str:
    """One line for an OSError: the path it names and its cause."""
    return f"{err.filename}: {io_cause(err)}" if err.filename else io_cause(err)


def safetensors_io_message(err: Exception) -> str:
    """One line for safetensors' own error type, which wraps the OS error's code in its text."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    code = re.search(r"code: (\d+)", text)
    return _IO_CAUSES.get(int(code.group(1)), text) if code else text
