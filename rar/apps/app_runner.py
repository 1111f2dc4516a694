"""The thread that decodes for `rar app`, and how concurrent Generate requests become one batch.

Gradio runs each request's handler in a worker thread; the handlers hand their work to one
`DecodeRunner`, which runs it on the thread that called `run` (the process's main thread in
`rar app`). Two reasons:
- torch's and rar's compiled CPU kernels share one OpenMP runtime whose thread teams belong to the
  calling thread; from a Gradio worker thread RAR-B's decode was measured 1.5-2x slower than from
  the main thread (BENCHMARKS.md, app under load);
- one thread sees every waiting request: Generate requests that arrive within `window` seconds of
  each other (up to `max_requests`) are decoded together by `generate_many`, so a burst of users
  shares the network passes.
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

    def generate(self, generate_many, request):
        """generate_many([request, ...])[i] for this request, batched with others waiting."""
        if self._inline():
            return generate_many([request])[0]
        done = concurrent.futures.Future()
        self.jobs.put(("generate", (generate_many, request), done))
        return done.result()

    def run(self, stop=None) -> None:
        """Serve jobs on this thread until KeyboardInterrupt or `shutdown`, then call `stop`."""
        self.jobs, self.thread = queue.Queue(), threading.current_thread()
        later: list = []
        try:
            while True:
                try:
                    job = later.pop(0) if later else self.jobs.get(timeout=0.5)  # a timeout: Ctrl-C is seen
                except queue.Empty:
                    continue
                if job is None:
                    break
                if job[0] == "generate":
                    later += self._run_generate([job])
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

    def _run_generate(self, batch: list) -> list:
        """Gather Generate jobs for `window` seconds after the last one came (other jobs are kept
        for later, in order), then decode them together; returns the kept jobs."""
        kept = []
        while len(batch) < self.max_requests:
            try:
                job = self.jobs.get(timeout=self.window)
            except queue.Empty:
                break
            if job is not None and job[0] == "generate" and job[1][0] is batch[0][1][0]:
                batch.append(job)
            else:
                kept.append(job)
                if job is None:
                    break
        generate_many = batch[0][1][0]
        self._settle([j[2] for j in batch], lambda: generate_many([j[1][1] for j in batch]))
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
