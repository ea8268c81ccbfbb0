"""Read input tensors ahead of their use in a background thread, so reading overlaps with factorizing.

The thread reads tensors in the order they will be asked for and hands them over through a queue of `depth`
tensors; at most depth + 1 tensors are read ahead, so memory stays bounded whatever the model size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable

_DONE = object()


class Prefetcher:
    """depth=0 reads in the caller's thread, when asked (no read-ahead: for measurements)."""

    def __init__(self, keys: Iterable, read: Callable, depth: int = 2):
        self._read, self._inline = read, depth <= 0
        if self._inline:
            return
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(keys), read), daemon=True, name="smile-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, keys, read) -> None:
        try:
            for key in keys:
                if not self._put((key, read(*key), None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((None, None, e))
            return
        self._put((_DONE, None, None))

    def get(self, *key):
        """The tensor for key (checkpoint, name): the next one in the order given."""
        if self._inline:
            return self._read(*key)
        got, tensor, error = self._queue.get()
        if error is not None:
            raise error
        if got is _DONE or got[0] is not key[0] or got[1] != key[1]:
            raise RuntimeError(f"prefetch order: expected {key!r}, read {got!r}")
        return tensor

    def close(self) -> None:
        if self._inline:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
