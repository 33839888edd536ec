"""One worker helper for Train and Segment: start, stop, live updates, finish, failure.

The generator runs in a napari thread worker; what it yields reaches the GUI thread in
batches at most every ``LIVE_INTERVAL_S`` (only the newest value, unless ``keep_all`` or
a value is urgent), so a fast loop of tiles or steps cannot flood the event loop.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QPushButton, QWidget

logger = logging.getLogger("napari_unet._widgets")
# Each delivery repaints the status, progress bar and plot: one flush of the whole window,
# about 30 ms of the GUI thread under software OpenGL (40-60 on a busy CPU); twice a second
# keeps the status live and those gaps under 2% of the time.
LIVE_INTERVAL_S = 0.5
# Niceness added to a worker thread (Linux; the threads it starts inherit it). On a busy
# 2-core machine the GUI thread spent most of each 50-900 ms stall waiting for a CPU that
# the worker's own compute held (profiled with benchmarks/bench_gui.py --profile): a lower
# priority lets the GUI thread in first and costs the worker only the GUI's short bursts.
# Measured (bench_gui --quick --worker-nice N, load average 7-8 on 2 cores: noisy): p99 gap
# while training / segmenting 2048² 69 / 78 ms at 0, 59 / 56 at +2, 49 / 51 at +5, but +5
# and +10 made training 2-4x slower on that loaded machine; +2 cost no measurable speed.
WORKER_NICE = 2
# Imported lazily by torch / the engine on the first run; importing holds the GIL for long
# stretches (torch._dynamo alone: 800 modules, ~4 s on a 2-core CPU), which froze the GUI
# for up to 2 s when training started. Imported in the background when a widget opens.
WARM_MODULES = ("torch._dynamo", "skimage.segmentation", "skimage.feature", "skimage.filters",
                "napari_unet.postprocess", "napari_unet.stitch", "napari_unet.train")
_warm: list[threading.Thread] = []


def warm_up() -> threading.Thread:
    """Import the engine's lazily imported heavy modules in a background thread (once)."""
    if not _warm:
        def run() -> None:
            for name in WARM_MODULES:
                with contextlib.suppress(Exception):
                    importlib.import_module(name)

        thread = threading.Thread(target=run, name="napari-unet warm-up", daemon=True)
        thread.start()
        _warm.append(thread)
    return _warm[0]


@dataclass
class Failure:
    """What a worker returns instead of raising (see :func:`guarded`)."""

    error: BaseException
    traceback: str = ""


def lower_thread_priority(increment: int | None = None) -> bool:
    """Make the calling thread ``increment`` nicer than the GUI (main) thread (Linux only,
    where the niceness is per thread; elsewhere it would apply to the whole process).
    Threads it starts later inherit it. Returns whether it changed; never raises."""
    increment = WORKER_NICE if increment is None else increment
    if not sys.platform.startswith("linux") or increment <= 0:
        return False
    try:
        tid = threading.get_native_id()
        target = min(os.getpriority(os.PRIO_PROCESS, threading.main_thread().native_id)
                     + increment, 19)
        if os.getpriority(os.PRIO_PROCESS, tid) >= target:  # a reused pool thread
            return False
        os.setpriority(os.PRIO_PROCESS, tid, target)
    except (OSError, AttributeError):
        return False
    return True


def guarded(gen: Generator) -> Generator:
    """Run a generator in a worker; an exception comes back as a returned :class:`Failure`.

    Two reasons: superqt workers treat a RuntimeError from the generator as "worker deleted"
    and then emit neither ``errored`` nor ``finished`` (torch raises RuntimeError for many
    real failures), and napari's workers relay ``errored`` as a raw traceback notification
    on top of the widget's own explanation.

    The thread runs at a lower priority than the GUI (:func:`lower_thread_priority`; an
    unprivileged user cannot raise it back, so a pool thread napari reuses stays lower:
    harmless, it only runs background work).
    """
    lower_thread_priority()
    try:
        return (yield from gen)
    except Exception as exc:
        text = traceback.format_exc()
        logger.warning("napari-unet worker failed:\n%s", text)
        return Failure(exc, text)


class Job:
    """Base of the state a widget shares with its worker: the stop flag and start time."""

    def __init__(self) -> None:
        self.stop = False
        self.started = time.perf_counter()

    def cancel(self) -> bool:
        return self.stop


class JobRunner:
    """Runs one job at a time for a widget and keeps its Run / Stop buttons in step.

    ``on_progress(value)`` gets live updates (throttled), ``on_done(result)`` the returned
    value, ``on_failure(exc)`` an exception raised in the worker; ``on_finished()`` runs
    last in every case.
    """

    def __init__(self, owner: QWidget, run_button: QPushButton, stop_button: QPushButton,
                 *, urgent: Callable[[Any], bool] = lambda value: False,
                 keep_all: bool = False) -> None:
        self.run_button, self.stop_button = run_button, stop_button
        self.stop_button.setEnabled(False)
        self.urgent = urgent
        self.keep_all = keep_all  # deliver every value (in batches), not only the newest
        self.worker: Any = None
        self.job: Job | None = None
        self._pending: list[Any] = []
        self._last_live = 0.0
        self._timer = QTimer(owner)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._flush)
        self._callbacks: dict[str, Callable] = {}
        self._live: dict[str, Any] = {}
        # Stop a running job when its widget goes away (holds no reference to the widget).
        owner.destroyed.connect(functools.partial(_stop_live, self._live))

    def running(self) -> bool:
        return self.worker is not None

    def start(self, job: Job, gen: Generator, *, on_progress: Callable, on_done: Callable,
              on_failure: Callable, on_finished: Callable = lambda: None) -> Any:
        """Start ``gen`` in a worker thread; returns the worker."""
        from napari.qt.threading import create_worker

        self.job = job
        self._callbacks = {"progress": on_progress, "done": on_done, "failure": on_failure,
                           "finished": on_finished}
        worker = create_worker(guarded, gen, _start_thread=False,
                               _connect={"yielded": self._on_yielded,
                                         "returned": self._on_returned,
                                         "errored": self._on_errored,
                                         "finished": self._on_finished})
        self.worker = worker
        self._live.update(job=job, worker=worker)
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        worker.start()
        return worker

    def stop(self) -> bool:
        """Ask the job to stop at its next check; False when nothing runs."""
        if self.job is None or self.worker is None:
            return False
        self.job.stop = True
        return True

    # ------------------------------------------------------------ worker signals

    def _on_yielded(self, value: Any) -> None:
        self._pending.append(value)
        wait = LIVE_INTERVAL_S - (time.perf_counter() - self._last_live)
        if self.urgent(value) or wait <= 0:
            self._flush()
        elif not self._timer.isActive():
            self._timer.start(int(wait * 1000) + 1)

    def _flush(self) -> None:
        """Deliver the newest pending value, and every urgent one."""
        self._timer.stop()
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._last_live = time.perf_counter()
        for value in pending[:-1]:
            if self.keep_all or self.urgent(value):
                self._callbacks["progress"](value)
        self._callbacks["progress"](pending[-1])

    def _on_returned(self, value: Any) -> None:
        self._flush()
        if isinstance(value, Failure):
            self._callbacks["failure"](value.error)
        else:
            self._callbacks["done"](value)

    def _on_errored(self, exc: BaseException) -> None:  # not expected: guarded() catches
        self._callbacks["failure"](exc)

    def _on_finished(self) -> None:
        self.worker = None
        self._live.clear()
        self.run_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self._callbacks["finished"]()


def _stop_live(live: dict[str, Any], *_: Any) -> None:
    job, worker = live.get("job"), live.get("worker")
    if job is not None:
        job.stop = True
    if worker is not None:
        with contextlib.suppress(RuntimeError):
            worker.quit()


def make_worker(gen: Generator, *, yielded: Callable, returned: Callable, errored: Callable,
                finished: Callable) -> Any:
    """A napari generator worker (not started) running ``gen`` under :func:`guarded`, for
    small jobs that need no :class:`JobRunner` (e.g. an export)."""
    from napari.qt.threading import create_worker

    return create_worker(
        guarded, gen, _start_thread=False,
        _connect={"yielded": yielded, "returned": returned, "errored": errored,
                  "finished": finished},
    )
