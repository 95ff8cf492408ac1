"""Progress users can follow: log lines on stderr and, on a terminal, a progress bar.

The estimators log one INFO record per iteration on the ``spark_gpu_mf`` logger, for example
``ALS iteration 3/10: 0.812s``. :class:`ConsoleHandler` prints every record and recognizes
progress records, either by an ``progress=(done, total)`` attribute (``logger.info(...,
extra={"progress": (3, 10)})``) or by the text ``<name> iteration|epoch <done>/<total>``, and
keeps a bar on the terminal's last line::

    ALS [##########..........] 5/10 iterations, 0.84 s/iteration, about 4 s left

No estimator code knows about the bar; a job only runs inside :func:`job_logging`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

PACKAGE_LOGGER = "spark_gpu_mf"
#: "1" or "0" forces the bar on or off. spark-submit hands the Python driver pipes, never a
#: terminal, so ``spark-gpu-mf`` sets "1" when its own output is a terminal.
PROGRESS_BAR_ENV = "SPARK_GPU_MF_PROGRESS_BAR"
_PROGRESS_TEXT = re.compile(
    r"^(?P<label>.*?)\s*\b(?P<unit>iteration|epoch)s?\s+(?P<done>\d+)\s*/\s*(?P<total>\d+)\b"
)


@dataclass(frozen=True)
class Progress:
    """One step of a loop with a known length: ``done`` of ``total`` ``unit``s of ``label``."""

    label: str
    done: int
    total: int
    unit: str = "iteration"


def progress_of(record: logging.LogRecord) -> Progress | None:
    """The loop progress a log record reports, or None for ordinary records."""
    explicit = getattr(record, "progress", None)
    if explicit is not None:
        done, total = explicit
        label = getattr(record, "progress_label", record.name)
        return Progress(str(label), int(done), int(total))
    match = _PROGRESS_TEXT.match(record.getMessage())
    if match is None or int(match["total"]) < 1:
        return None
    label = match["label"].strip() or record.name
    return Progress(label, int(match["done"]), int(match["total"]), match["unit"])


class ConsoleHandler(logging.Handler):
    """Writes records to ``stream``; with ``show_bar``, also redraws a progress bar below them.

    The bar lives on the last line: before a record is written the bar is wiped, after it the
    bar is drawn again, and when a loop finishes the finished bar stays as a line of its own.
    """

    def __init__(self, stream: TextIO, show_bar: bool):
        super().__init__()
        self.stream = stream
        self.show_bar = show_bar
        self._bar_width = 0  # characters of the bar currently on screen (0: none)
        self._loop: Progress | None = None
        self._loop_started = 0.0
        self._previous_created = 0.0  # time of the record before the current one

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            progress = progress_of(record) if self.show_bar else None
            self.acquire()
            try:
                previous, self._previous_created = self._previous_created, record.created
                self._wipe_bar()
                self.stream.write(text + "\n")
                if progress is not None:
                    self._advance(progress, record.created, previous)
                elif self._loop is not None:
                    self._draw_bar()
                self.stream.flush()
            finally:
                self.release()
        except Exception:  # noqa: BLE001 - logging must never break the job
            self.handleError(record)

    def _advance(self, progress: Progress, created: float, previous: float) -> None:
        same_loop = (
            self._loop is not None
            and (self._loop.label, self._loop.total) == (progress.label, progress.total)
            and progress.done > self._loop.done
        )
        if not same_loop:
            # The first record arrives after its step ran: the step started at the previous
            # record of any kind (such as the setup line), if there was one.
            self._loop_started = previous or created
        self._loop = progress
        self._draw_bar(seconds_per_step=(created - self._loop_started) / max(progress.done, 1))
        if progress.done >= progress.total:
            self.stream.write("\n")
            self._bar_width = 0
            self._loop = None

    def _draw_bar(self, seconds_per_step: float | None = None) -> None:
        text = format_bar(self._loop, seconds_per_step, shutil.get_terminal_size().columns)
        self.stream.write("\r" + text)
        self._bar_width = len(text)

    def _wipe_bar(self) -> None:
        if self._bar_width:
            self.stream.write("\r" + " " * self._bar_width + "\r")
            self._bar_width = 0


def format_bar(progress: Progress, seconds_per_step: float | None, columns: int = 80) -> str:
    """``ALS [######....] 3/10 iterations, 0.81 s/iteration, about 6 s left``, fitted to width."""
    unit = progress.unit
    plural = f"{unit}s" if progress.total != 1 else unit
    tail = f" {progress.done}/{progress.total} {plural}"
    if seconds_per_step is not None and progress.done > 0:
        tail += f", {seconds_per_step:.2f} s/{unit}"
        remaining = (progress.total - progress.done) * seconds_per_step
        if progress.done < progress.total:
            tail += f", about {remaining:.0f} s left"
    head = f"{progress.label} ["
    # A fixed width while there is room, so that the bar does not jump as the tail changes.
    width = max(10, min(30, columns - len(head) - len(tail) - 2))
    filled = round(width * min(progress.done, progress.total) / progress.total)
    return f"{head}{'#' * filled}{'.' * (width - filled)}]{tail}"[: max(columns - 1, 20)]


def wants_bar(stream: TextIO) -> bool:
    """Whether to draw the bar on ``stream``: forced by the environment, else if a terminal."""
    forced = os.environ.get(PROGRESS_BAR_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(getattr(stream, "isatty", bool)())


@contextlib.contextmanager
def job_logging(verbose: bool = False, stream: TextIO | None = None) -> Iterator[ConsoleHandler]:
    """Show the package's log records (one per iteration) on stderr, with a bar on terminals.

    Only the ``spark_gpu_mf`` logger is configured (INFO, or DEBUG when ``verbose``), not the
    root logger, so py4j and other libraries stay quiet; pyspark's JSON error records are
    silenced unless ``verbose`` (the job prints the error as one line). Everything is restored
    on exit, so that a job run inside a larger Python program leaves its logging as it was.
    """
    stream = stream or sys.stderr
    package_logger = logging.getLogger(PACKAGE_LOGGER)
    handler = ConsoleHandler(stream, show_bar=wants_bar(stream))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    error_loggers = _pyspark_error_loggers()
    saved = (
        package_logger.level,
        package_logger.propagate,
        [error_logger.level for error_logger in error_loggers],
    )
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    package_logger.propagate = False
    for error_logger in error_loggers:
        error_logger.setLevel(logging.WARNING if verbose else logging.CRITICAL)
    try:
        yield handler
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(saved[0])
        package_logger.propagate = saved[1]
        for error_logger, level in zip(error_loggers, saved[2]):
            error_logger.setLevel(level)


def _pyspark_error_loggers() -> list[logging.Logger]:
    """pyspark >= 4 logs every DataFrame/SQL error as a JSON record with the Java stack trace,
    before the exception even reaches the job."""
    try:
        from pyspark.logger import PySparkLogger
    except ImportError:  # pyspark < 4 has no such loggers
        return []
    return [
        PySparkLogger.getLogger(name)
        for name in ("DataFrameQueryContextLogger", "SQLQueryContextLogger")
    ]
