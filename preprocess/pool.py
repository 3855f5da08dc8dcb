"""Running shards: in this process, or on `--workers` spawned processes (a ProcessPoolExecutor), with a
progress bar fed by the workers.

A worker that dies (killed, out of memory) breaks the pool: `concurrent.futures` raises BrokenProcessPool
instead of waiting forever, the other workers are stopped, and the build ends with `BuildInterrupted`
(exit status 3). Shards finished before that keep their part files, so `--resume` redoes only the rest.

The other way round, a worker whose parent died (the build SIGKILLed, its node's job step cancelled) exits at
once: left running, it would finish its shard into OUT after the lock was released, and rename its temporary
files over those of the `--resume` that follows (the resume then failed with `No such file ... .emb.tmp`, or
worse, marked a shard finished with another process's half-written rows).
"""

from __future__ import annotations

import os
import queue as queue_module
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from engine.data.records import ShardTask
from preprocess.config import BuildConfig, BuildInterrupted
from preprocess.shard_builder import ShardBuilder

_WORKER: ShardBuilder | None = None


# How often a worker checks that the build process that started it is still alive.
PARENT_POLL_S = 0.1


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker the moment its parent is gone (reparented: `os.getppid()` changes). The pool's own
    queues cannot tell it: an orphaned worker blocks on them forever, or first finishes its shard."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # no cleanup: temporary files are removed by the next --resume

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(config: BuildConfig, input_names: list[str], encoder: dict, progress_queue, threads: int,
                 parent_pid: int | None = None) -> None:
    global _WORKER
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    _WORKER = ShardBuilder(config, input_names, encoder, progress=lambda *delta: progress_queue.put(delta),
                           torch_threads=threads)


def _run_task(task: ShardTask) -> dict:
    return _WORKER.process(task)


class Progress:
    """A tqdm bar over records with samples/s, tokens/s and images/s (rank 0 only; off when not a terminal);
    it also keeps the totals for the summary line."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.start = time.monotonic()
        self.samples = 0
        self.tokens = 0
        self.images = 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="sample", desc=label, file=sys.stderr, dynamic_ncols=True,
                                disable=None)
            except ImportError:
                self.bar = None

    def update(self, samples: int, tokens: int, images: int) -> None:
        self.samples += samples
        self.tokens += tokens
        self.images += images
        if self.bar is not None:
            self.bar.update(samples)
            elapsed = max(time.monotonic() - self.start, 1e-6)
            self.bar.set_postfix_str(f"{self.samples / elapsed:.0f} samples/s, {self.tokens / elapsed:.0f} tok/s, "
                                     f"{self.images / elapsed:.1f} img/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_tasks(config: BuildConfig, tasks: list[ShardTask], input_names: list[str], encoder: dict,
              progress: Progress) -> None:
    """Build `tasks`: here when there is one worker (or one task), else on a pool of spawned processes."""
    if not tasks:
        return
    if config.workers == 1 or len(tasks) == 1:
        builder = ShardBuilder(config, input_names, encoder, progress=progress.update)
        for task in tasks:
            builder.process(task)
        return
    import multiprocessing

    workers = min(config.workers, len(tasks))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # fork + torch/OpenMP threads is unsafe
    progress_queue = context.Queue()
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                   initargs=(config, input_names, encoder, progress_queue, threads, os.getpid()))
    futures = {executor.submit(_run_task, task): task for task in tasks}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress_queue, progress)
            for future in done:
                future.result()  # re-raises a worker's exception (BrokenProcessPool when one died)
        _drain(progress_queue, progress)
    except BrokenProcessPool:
        unfinished = sorted(task.shard for future, task in futures.items()
                            if not future.done() or future.cancelled() or future.exception() is not None)
        _stop(executor)
        raise BuildInterrupted(
            f"a worker process died (killed, or out of memory?) while building shards {unfinished[:8]}"
            f"{'...' if len(unfinished) > 8 else ''}; finished shards are kept in {config.output}: rerun "
            "the same command with --resume to finish the build") from None
    except BaseException:
        _stop(executor)
        raise
    executor.shutdown(wait=True)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (a shard in progress is redone on --resume)."""
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()
    executor.shutdown(wait=True, cancel_futures=True)


def _drain(progress_queue, progress: Progress) -> None:
    try:
        while True:
            progress.update(*progress_queue.get_nowait())
    except queue_module.Empty:
        return
    except (OSError, EOFError, ValueError):  # the queue's feeder died with a worker
        return
