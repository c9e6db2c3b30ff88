"""bench/fa4_check.py where FlashAttention 4 cannot be imported (any machine without it, this one): one JSON
line naming the error, no traceback, so that a device call's other runs go on and the line says why."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def test_without_flash_attention_4_the_check_prints_why(bench_script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not importable, whatever this machine has
    fa4_check = bench_script("fa4_check")
    fa4_check.main()
    line = json.loads(capsys.readouterr().out)
    assert line["run"] == "fa4check"
    assert line["error"].startswith("ModuleNotFoundError") and "flash_attn" in line["error"]
