"""Record the argv of every process a Python process starts, and of the Python process itself.

A Python audit hook sees `subprocess.Popen`, `os.exec*`, `os.posix_spawn`, `os.spawn*` and
`os.system` before the process starts. Copied as `sitecustomize.py` into a folder on PYTHONPATH it
also runs in every Python child (torchrun ranks, the worker inside the container stand-in), which
then records its own `sys.orig_argv` and which credential variables its environment holds.
Recording is on while `MEDTUNE_ARGV_LOG` names a file (one JSON line per event); the hook is
installed once per process and is permanent, as audit hooks are.
"""

import json
import os
import sys

LOG_VAR = "MEDTUNE_ARGV_LOG"
WATCHED_VARS_VAR = "MEDTUNE_ARGV_LOG_VARS"  # comma-separated names whose presence a child reports
ARGV_AT = {"subprocess.Popen": 1, "os.exec": 1, "os.posix_spawn": 1, "os.spawn": 2, "os.system": 0}


def _text(value):
    if isinstance(value, (bytes, str, os.PathLike)):
        return os.fsdecode(value)
    return str(value)


def _write(record):
    path = os.environ.get(LOG_VAR)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"pid": os.getpid(), **record}) + "\n")


def _hook(event, args):
    if event in ARGV_AT and os.environ.get(LOG_VAR):
        argv = args[ARGV_AT[event]]
        argv = [_text(a) for a in argv] if isinstance(argv, (list, tuple)) else [_text(argv)]
        _write({"event": event, "argv": argv})


def install():
    if not getattr(sys, "_medtune_argv_audit", False):
        sys._medtune_argv_audit = True
        sys.addaudithook(_hook)


def record_start():
    names = [n for n in os.environ.get(WATCHED_VARS_VAR, "").split(",") if n]
    _write({"event": "start", "argv": list(sys.orig_argv), "env_has": sorted(n for n in names if os.environ.get(n))})


if __name__ == "sitecustomize":
    install()
    record_start()
