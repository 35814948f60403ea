"""DevicePrefetcher: same batches in the same order, state of the consumed position, errors
passed on, the thread stops."""
import threading
import time

import numpy as np
import pytest

from vlmjax.train.prefetch import DevicePrefetcher


class Source:
    """A batch iterator with the input pipeline's interface (get_state, skip_counts, close)."""

    def __init__(self, n, fail_at=None):
        self.n, self.fail_at, self.position, self.closed = n, fail_at, 0, False

    def __next__(self):
        if self.position == self.fail_at:
            raise ValueError("bad shard")
        if self.position >= self.n:
            raise StopIteration
        self.position += 1
        time.sleep(0.001)
        return {"x": np.full((2,), self.position)}

    def get_state(self):
        return {"position": self.position}

    @property
    def skip_counts(self):
        return {"corrupt": self.position // 2}

    def close(self):
        self.closed = True


def test_batches_in_order_and_state_is_the_consumed_position():
    source = Source(6)
    calls = []
    prefetcher = DevicePrefetcher(source, lambda b: calls.append(1) or b["x"] * 10, size=2)
    assert prefetcher.get_state() == {"position": 0}
    first = next(prefetcher)
    time.sleep(0.05)  # the thread reads ahead meanwhile
    assert source.position > 1  # it really ran ahead of the consumer
    assert prefetcher.get_state() == {"position": 1}
    assert prefetcher.skip_counts == {"corrupt": 0}
    rest = list(prefetcher)
    assert [int(b[0]) for b in [first, *rest]] == [10, 20, 30, 40, 50, 60]
    assert prefetcher.get_state() == {"position": 6}
    assert prefetcher.skip_counts == {"corrupt": 3}
    assert len(calls) == 6
    prefetcher.close()
    assert source.closed


def test_source_errors_reach_the_consumer():
    prefetcher = DevicePrefetcher(Source(10, fail_at=2), lambda b: b)
    next(prefetcher), next(prefetcher)
    with pytest.raises(ValueError, match="bad shard"):
        next(prefetcher)


def test_close_stops_the_thread_with_batches_pending():
    prefetcher = DevicePrefetcher(Source(10_000), lambda b: b, size=1)
    next(prefetcher)
    prefetcher.close()
    assert not any(t.name == "device-prefetch" and t.is_alive() and t is prefetcher._thread
                   for t in threading.enumerate())


def test_other_attributes_are_the_sources():
    source = Source(3)
    source.num_shards = 4
    prefetcher = DevicePrefetcher(source, lambda b: b)
    assert prefetcher.num_shards == 4
    with pytest.raises(AttributeError):
        prefetcher.no_such_thing
    prefetcher.close()
