"""Progress bars on a terminal, silence elsewhere (logs, pipes, CI)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap `items` in a tqdm bar when stdout is a terminal; pass them through otherwise."""
    if not sys.stdout.isatty():
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr)
