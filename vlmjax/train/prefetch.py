"""Device prefetch: the next batches are read from the host pipeline and put on the devices in
a background thread while the current step runs.

`DevicePrefetcher` wraps any batch iterator and keeps its interface: `get_state()` and
`skip_counts` describe the position after the last batch *returned* (not after the ones read
ahead), so a checkpoint taken between steps resumes exactly where the training loop was.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

_END = object()


def _snapshot(source) -> tuple[Any, Any]:
    state = source.get_state() if hasattr(source, "get_state") else None
    skips = dict(source.skip_counts) if hasattr(source, "skip_counts") else {}
    return state, skips


def _fill(source, to_device, out: queue.Queue, stop: threading.Event):
    # A plain function, not a method: the thread must not keep the prefetcher alive, so that
    # dropping the prefetcher (its __del__) stops the thread.
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            batch = next(source)
            if not put((to_device(batch), _snapshot(source))):
                return
    except StopIteration:
        put(_END)
    except BaseException as error:  # re-raised in the consumer's thread
        put(error)


class DevicePrefetcher:
    """Iterates `to_device(batch)` over `source`, `size` batches ahead in a thread."""

    def __init__(self, source: Iterator[dict], to_device: Callable[[dict], Any], size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self.source = source
        self._state, self._skips = _snapshot(source)
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=_fill, args=(source, to_device, self._queue,
                                                            self._stop),
                                        name="device-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        batch, (self._state, self._skips) = item
        return batch

    def get_state(self):
        """The source's state after the last batch returned by `next`."""
        return self._state

    def __getattr__(self, name):
        # Other attributes (e.g. ShardedInput.num_shards) are the source's: read them for
        # settings fixed at construction, not for positions (those run ahead).
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    @property
    def skip_counts(self) -> dict:
        return self._skips

    def close(self):
        """Stops the thread, drops the batches read ahead and closes the source."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._done = True
        if hasattr(self.source, "close"):
            self.source.close()

    def __del__(self):
        self._stop.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
