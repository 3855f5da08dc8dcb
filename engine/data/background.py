"""`OrderedWorker`: one stage of a pipeline on its own thread, so the stage before it keeps working meanwhile.

Items are handled strictly in submission order by one thread, so results (and the bytes they become) never
depend on timing. `submit` blocks while `depth` items are waiting (bounded memory); `close` waits for the rest
and re-raises the first error. Decoding the next batch while the device encodes this one, and encoding while the
previous rows are copied back and written, is what keeps a GPU encoder busy (torch, DALI and file writes all
release the GIL).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_STOP = object()


class OrderedWorker:
    """Runs `function(item)` for every submitted item, in order, on one background thread."""

    def __init__(self, function: Callable, depth: int = 2, name: str = "stage") -> None:
        self.function = function
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is None:  # after an error, drain without work so submit never blocks forever
                try:
                    self.function(item)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller by submit/close
                    self._error = error

    def submit(self, item) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def close(self) -> None:
        """Wait for every submitted item; raise the first error met."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        if self._error is not None:
            raise self._error
