"""bounded_imap: ordered results, and the input is read lazily (at most two blocks ahead)."""
from multiprocessing import get_context

from data.parallel import bounded_imap


def _square(x):
    return x * x


def test_bounded_imap_is_ordered_and_lazy():
    consumed = []

    def items():
        for i in range(100):
            consumed.append(i)
            yield i

    with get_context("fork").Pool(2) as pool:
        results = bounded_imap(pool, _square, items(), block=4)
        first = [next(results) for _ in range(3)]
        assert first == [0, 1, 4]
        assert len(consumed) <= 8  # Pool.imap would have read all 100 by now
        assert list(results) == [i * i for i in range(3, 100)]


def test_bounded_imap_empty_input():
    with get_context("fork").Pool(2) as pool:
        assert list(bounded_imap(pool, _square, [], block=4)) == []
