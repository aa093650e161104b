"""Exceptions a user can act on. The CLI prints their message as one line and exits 2."""


class PatcherError(Exception):
    """Bad input: a missing file, an invalid spec, a patch for another model, and so on."""
