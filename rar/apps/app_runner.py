"""The thread that decodes for `rar app`, and how concurrent requests become one batch.

Gradio runs each request's handler in a worker thread; the handlers hand their work to one
`DecodeRunner`, which runs it on the thread that called `run` (the process's main thread in
`rar app`). Two reasons:
- torch's and rar's compiled CPU kernels share one OpenMP runtime whose thread teams belong to the
  calling thread; from a Gradio worker thread RAR-B's decode was measured 1.5-2x slower than from
  the main thread (BENCHMARKS.md, app under load);
- one thread sees every waiting request: requests of one kind (Generate, Edit) that arrive within
  `window` seconds of each other (up to `max_requests`) are computed together by that kind's
  function (`app_requests.generate_results`, `edit_results`), so a burst of users shares the
  network passes.
Without `run` (tests that call the handlers, notebooks) work runs inline in the caller's thread.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading

GATHER_WINDOW_S = 0.25  # a request waits at most this long for others to join its batch


class DecodeRunner:
    def __init__(self, max_requests: int = 8, window: float = GATHER_WINDOW_S):
        self.max_requests, self.window = max_requests, window
        self.jobs: queue.Queue | None = None
        self.thread: threading.Thread | None = None

    def _inline(self) -> bool:
        return self.jobs is None or threading.current_thread() is self.thread

    def call(self, fn, *args):
        """fn(*args) on the runner's thread (one at a time, in arrival order)."""
        if self._inline():
            return fn(*args)
        done = concurrent.futures.Future()
        self.jobs.put(("call", (fn, args), done))
        return done.result()

    def batch(self, many, request):
        """many([request, ...])[i] for this request, computed together with the other requests of
        the same `many` that are waiting (Generate requests, Edit requests)."""
        if self._inline():
            return many([request])[0]
        done = concurrent.futures.Future()
        self.jobs.put(("batch", (many, request), done))
        return done.result()

    def run(self, stop=None) -> None:
        """Serve jobs on this thread until KeyboardInterrupt or `shutdown`, then call `stop`."""
        self.jobs, self.thread = queue.Queue(), threading.current_thread()
        later: list = []  # jobs taken from the queue while a batch gathered, in arrival order
        try:
            while True:
                try:
                    job = later.pop(0) if later else self.jobs.get(timeout=0.5)  # a timeout: Ctrl-C is seen
                except queue.Empty:
                    continue
                if job is None:
                    break
                if job[0] == "batch":
                    later = self._run_batch(job, later)
                else:
                    self._settle([job[2]], lambda: [job[1][0](*job[1][1])])
        except KeyboardInterrupt:
            pass
        finally:
            self.jobs = self.thread = None
            if stop is not None:
                stop()

    def shutdown(self) -> None:
        if self.jobs is not None:
            self.jobs.put(None)

    def _run_batch(self, first, later: list) -> list:
        """Serve `first` with the waiting jobs of the same function: those already set aside in
        `later`, then those arriving within `window` seconds of the last one (up to `max_requests`
        in all); other jobs are kept, in order. Returns the jobs still to run."""
        many = first[1][0]
        same = [j for j in later if j is not None and j[0] == "batch" and j[1][0] is many][:self.max_requests - 1]
        kept = [j for j in later if not any(j is s for s in same)]
        batch = [first, *same]
        while len(batch) < self.max_requests and None not in kept:
            try:
                job = self.jobs.get(timeout=self.window)
            except queue.Empty:
                break
            if job is not None and job[0] == "batch" and job[1][0] is many:
                batch.append(job)
            else:
                kept.append(job)
        self._settle([j[2] for j in batch], lambda: many([j[1][1] for j in batch]))
        return kept

    @staticmethod
    def _settle(futures, compute) -> None:
        try:
            results = compute()
        except BaseException as err:  # noqa: BLE001 - handed to every waiting request
            for f in futures:
                f.set_exception(err)
            return
        for f, r in zip(futures, results):
            f.set_result(r)
