"""Exceptions a user can act on. The CLI prints their message as one line and exits with
the exception's `exit_code`: 2 for bad input, 1 when the input was fine but the result
falls short (the same code as a failed verification gate)."""


class PatcherError(Exception):
    """Bad input: a missing file, an invalid spec, a patch for another model, and so on."""

    exit_code = 2


class ErasureIncomplete(PatcherError):
    """The edit could not erase every forget fact: the result, not the input, is at fault."""

    exit_code = 1


def quoted(text: str, limit: int = 60) -> str:
    """`text` quoted for a one-line message, cut to `limit` characters (a spec's prompt may be pages long)."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
