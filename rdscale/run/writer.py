"""Output writing off the forward's critical path: a bounded queue to one writer thread.

The apply stage hands each chunk's output (host copies of the embeddings plus the rows they belong to) to a
`ChunkWriter`; the writer thread builds the Arrow tables and writes the Lance fragments while the caller runs the
next chunk's forward. The queue is bounded (`max_pending` chunks), so a slow disk throttles the forward instead of
letting host memory grow. `drain()` waits for every submitted chunk and returns their results in submission
order; the stage calls it before it returns a shard's fragment descriptions, so the driver still only ever sees
(and commits) fragments that are completely written. An exception raised by a job is re-raised in the caller,
unchanged, by the next `submit()` or by `drain()`; jobs queued after a failed one are skipped.

Writing releases the GIL for most of its time (Arrow buffers, Lance's Rust writer), which is what makes a thread
enough. With `overlap=False` every job runs inline in `submit()` (the serial path, same results).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_STOP = object()


class ChunkWriter:
    def __init__(self, overlap: bool = True, max_pending: int = 2):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.overlap = overlap
        self.max_pending = max_pending
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._results: list[Any] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------------------------- caller

    def submit(self, job: Callable[[], Any]) -> None:
        """Run `job()` on the writer thread (blocks while `max_pending` jobs are already waiting)."""
        self._raise_pending()
        if not self.overlap:
            try:
                self._results.append(job())
            except BaseException:
                self._results = []  # as on the thread: the shard's earlier results are dropped with the error
                raise
            return
        if self._thread is None or not self._thread.is_alive():
            self._queue = queue.Queue(maxsize=self.max_pending)
            self._thread = threading.Thread(target=self._loop, args=(self._queue,), name="rdscale-writer",
                                            daemon=True)
            self._thread.start()
        index = len(self._results)
        self._results.append(None)
        self._queue.put((index, job))

    def drain(self) -> list[Any]:
        """Wait for every submitted job; their results in submission order. Re-raises a job's exception."""
        if self._queue is not None:
            self._queue.join()
        results, self._results = self._results, []
        self._raise_pending()
        return results

    def close(self) -> None:
        """Stop the thread (after the jobs already queued). The writer can be used again afterwards."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._thread = None
        self._queue = None

    def _raise_pending(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            if self._queue is not None:
                self._queue.join()  # the skipped jobs are done too: the next shard starts clean
            self._results = []
            raise error

    # -------------------------------------------------------------------------------------------------- thread

    def _loop(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            try:
                if item is _STOP:
                    return
                index, job = item
                with self._lock:
                    failed = self._error is not None
                if failed:
                    continue  # an earlier job of this shard failed: its result will never be used
                try:
                    self._results[index] = job()
                except BaseException as e:  # noqa: BLE001 - handed to the caller as is
                    with self._lock:
                        self._error = e
            finally:
                q.task_done()
