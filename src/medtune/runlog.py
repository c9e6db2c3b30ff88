"""Logging for a run: rich on a terminal, one plain line per event in logs/finetune.log and non-TTYs.

Every handler carries a filter that replaces known secret values (credentials.secret_values: the
Hub token and the cloud keys) with `***`, so a credential that reaches a log message or a traceback
by accident (an exception text, a library's debug line) never reaches the console or disk.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from rich.logging import RichHandler

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret value replaced by `***`."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text


class RedactSecrets(logging.Filter):
    """Redacts the message and, for `log.exception`, the traceback text (which may quote a secret)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            if any(s in text for s in self.secrets):
                record.msg, record.args = redact(text, self.secrets), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text, self.secrets)
            if record.stack_info:
                record.stack_info = redact(record.stack_info, self.secrets)
        return True


class CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the stream of set-up time, so
    a caller that swaps stderr (a test harness, an embedding application) never gets a closed stream."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def quiet_import_notices() -> None:
    """bitsandbytes' CPU backend logs at import time (peft imports it; so does `medtune run` before
    preflight) that an optional kernel package is missing, on every CPU with AVX512-BF16. With no
    handler set up yet, Python prints that to stderr, where it would bury a one-line error. Only that
    module is quieted, and only below ERROR."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def setup_logging(log_file: Path | None, secrets: list[str], verbose: bool = False) -> None:
    """Route medtune's and the libraries' logs to the console and (when given) the run's log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_medtune", False):
            root.removeHandler(handler)
            handler.close()
    redact = RedactSecrets(secrets)
    console: logging.Handler
    if sys.stderr.isatty():
        console = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
    else:
        console = CurrentStderr()
        console.setFormatter(logging.Formatter(PLAIN_FORMAT, "%H:%M:%S"))
    handlers = [console]
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler.addFilter(redact)
        handler._medtune = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("medtune").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not sys.stderr.isatty():
        # Progress bars redrawn with \r make Slurm logs and finetune.log unreadable.
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
