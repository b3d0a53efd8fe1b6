"""Ordered parallel map that reads its input lazily.

`multiprocessing.Pool.imap` pulls items from its iterator as fast as a feeder thread
can, so on a corpus larger than memory it would read everything ahead of the workers.
`bounded_imap` keeps at most two blocks of items in flight: memory stays flat however
long the input is.
"""
from __future__ import annotations

from itertools import islice
from typing import Callable, Iterable, Iterator


def bounded_imap(pool, fn: Callable, items: Iterable, block: int) -> Iterator:
    it = iter(items)
    pending = None
    while True:
        chunk = list(islice(it, block))
        submitted = pool.map_async(fn, chunk, chunksize=1) if chunk else None
        if pending is not None:
            yield from pending.get()
        if submitted is None:
            return
        pending = submitted
