"""Where a CLI stage's output goes: its own lines and progress bars to the terminal, everything Ray and
the libraries log (Ray Data operator progress and stats, Ray Train's per-report dumps, worker output,
placement-group and C++ warnings) to a log file under ``out/logs``; with ``--verbose`` to both.

Quiet mode moves the process's file descriptors 1 and 2 onto the log file, so output written below
Python (Ray's C++ core worker, native libraries) lands there too, and points ``sys.stdout`` and
``sys.stderr`` at copies of the terminal's descriptors for the stage's own lines and tqdm bars.
Ray's Python loggers and the lines its workers send to the driver are re-routed to the file.
Nothing happens when the streams are not the process's own (a test runner capturing them)."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path

LOG_DIR = Path("out/logs")
WORKER_LOGGER = "lowlight.workers"
# What `ray.init(log_to_driver=True)` names its handler of worker lines; reusing the name lets
# Ray's own shutdown remove ours.
RAY_PRINT_HANDLER = "ray_print_logs"

_handler: logging.Handler | None = None
_verbose = False
_ray_print = None  # Ray's own printer of worker lines, once replaced


def started() -> bool:
    return _handler is not None


def start(stage: str, verbose: bool = False, log_dir: Path = LOG_DIR) -> Path | None:
    """Route this process's output for one stage; the log file, or None when the streams are not ours."""
    global _handler, _verbose
    if _handler is not None or sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    # Append mode: the descriptors dup'ed onto it below share O_APPEND, so no writer overwrites another.
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (process lifetime)
    if not verbose:
        sys.stdout.flush()
        sys.stderr.flush()
        terminal_out, terminal_err = _reopen(sys.stdout), _reopen(sys.stderr)
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
        sys.stdout, sys.stderr = terminal_out, terminal_err
    _verbose = verbose
    # No level of its own: the loggers' levels decide (root and 'ray' INFO; 'ray.data' DEBUG, which
    # includes each Ray Data operator's metrics when it completes).
    _handler = _LogFileHandler(log)
    root = logging.getLogger()
    root.addHandler(_handler)
    if verbose:
        # A root handler of our own turns off logging's last-resort printing of warnings to stderr.
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        root.addHandler(console)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    route_ray_loggers()
    return path


class _LogFileHandler(logging.StreamHandler):
    """Keeps its own format: ray.init re-formats every handler attached to the 'ray' logger."""

    FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return self.FORMAT.format(record)


def _reopen(stream) -> object:
    """A new text stream on a copy of ``stream``'s descriptor (a tty stays a tty for tqdm and Ray Data)."""
    return os.fdopen(os.dup(stream.fileno()), "w", buffering=1, encoding=stream.encoding or "utf-8",
                     errors="replace")


def route_ray_loggers() -> None:
    """Ray's loggers to the log file: Ray configures 'ray' on import and 'ray.data' on ``import ray.data``
    with console handlers of their own that do not propagate, so call this again after such imports."""
    if _handler is None:
        return
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or not (name == "ray" or name.startswith("ray.")):
            continue
        if not _verbose:
            for handler in list(logger.handlers):
                if _is_console(handler):
                    logger.removeHandler(handler)
        if not logger.propagate and _handler not in logger.handlers:
            logger.addHandler(_handler)


def _is_console(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and handler is not _handler)


def capture_worker_logs() -> None:
    """After ``ray.init``: what Ray prints on the driver for others (its workers' and actors' output, the
    raylet's warnings) goes to the log file, and with --verbose through Ray's own printing too. Ray
    prints both through ``ray._private.worker.print_to_stdstream``, the first via a handler that
    ``ray.init`` registers, the second by calling it from a listener thread: both are re-pointed here."""
    if _handler is None:
        return
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    global _ray_print
    if _ray_print is None:
        _ray_print = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = _print_to_stdstream
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.add_handler(RAY_PRINT_HANDLER, functools.partial(_print_to_stdstream, ignore_prefix=ignore_prefix))


def _print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
    _log_worker_lines(data)
    if _verbose:
        _ray_print(data, ignore_prefix)


def _log_worker_lines(data: dict) -> None:
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    logger = logging.getLogger(WORKER_LOGGER)
    source = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({source} pid={data.get('pid')}) ".replace("( ", "(")
    for line in data.get("lines", []):
        # Progress-bar state that Ray renders as bars on a terminal: JSON noise in a file.
        if RAY_TQDM_MAGIC not in line:
            logger.info(prefix + line)
