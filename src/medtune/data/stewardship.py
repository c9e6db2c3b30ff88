"""Data stewardship before training: duplicates, train/eval overlap, and a PHI/PII scan.

The PHI scan is a pattern screen, not a de-identification tool: it catches the common shapes
(emails, phone numbers, US SSNs, medical record numbers, dates of birth, street addresses, names
after a title) so a team notices before a model memorises them. The report holds counts and row
numbers only, never the matched text.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter
from typing import Any

from medtune.errors import DataError

# Order matters where shapes overlap: an SSN is tried before a phone number.
PHI_PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "ssn": r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])",
    "phone": r"(?<![\d-])(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\d-])",
    "mrn": r"\b(?:MRN|medical record (?:number|no\.?|#))\s*[:#]?\s*[A-Z0-9][A-Z0-9-]{4,}\b",
    "date_of_birth": r"\b(?:DOB|D\.O\.B\.|date of birth|born on)\s*[:\-]?\s*"
                     r"(?:\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}|\d{4}-\d{2}-\d{2}|[A-Z][a-z]+\.? \d{1,2},? \d{4})",
    "street_address": r"\b\d{1,5} (?:[A-Z][a-z]+ ){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive"
                      r"|Court|Ct|Way|Place|Pl)\b\.?",
    "name_after_title": r"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.? (?:[A-Z][a-z]+)(?: [A-Z][a-z]+)?",
}
_CASE_SENSITIVE = {"street_address", "name_after_title"}  # capitalisation is what marks a name
_COMPILED = {name: re.compile(p, 0 if name in _CASE_SENSITIVE else re.IGNORECASE) for name, p in PHI_PATTERNS.items()}
# Cheap tests that rule a pattern out for most rows: the full patterns cost ~0.1 ms a row each.
_DIGITS = re.compile(r"\d{3}[ .)-]")
_PREFILTER = {
    "email": lambda text, low: "@" in text,
    "ssn": lambda text, low: "-" in text and _DIGITS.search(text) is not None,
    "phone": lambda text, low: _DIGITS.search(text) is not None,
    "mrn": lambda text, low: "mrn" in low or "record" in low,
    "date_of_birth": lambda text, low: "dob" in low or "d.o.b" in low or "birth" in low or "born" in low,
    "street_address": lambda text, low: re.search(r"\d [A-Z]", text) is not None,
    "name_after_title": lambda text, low: True,
}
EXAMPLE_ROWS = 5


def _matches(text: str) -> list[tuple[str, re.Match[str]]]:
    """(type, match) in text order; where shapes overlap the earlier type in PHI_PATTERNS wins."""
    low = text.lower()
    found: list[tuple[str, re.Match[str]]] = []
    for name, pattern in _COMPILED.items():
        if _PREFILTER[name](text, low):
            found += [(name, m) for m in pattern.finditer(text)
                      if not any(m.start() < other.end() and other.start() < m.end() for _, other in found)]
    return sorted(found, key=lambda item: item[1].start())


def scan_phi(texts: list[str]) -> dict[str, Any]:
    """Counts by type and example row numbers (1-based); never the matched text."""
    counts: Counter[str] = Counter()
    rows: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        for kind, _ in _matches(text):
            counts[kind] += 1
            examples = rows.setdefault(kind, [])
            if len(examples) < EXAMPLE_ROWS and (not examples or examples[-1] != i + 1):
                examples.append(i + 1)
    return {"total": sum(counts.values()),
            "by_type": {k: {"count": counts[k], "example_rows": rows[k]} for k in PHI_PATTERNS if counts[k]}}


def redact(text: str) -> str:
    out, last = [], 0
    for kind, m in _matches(text):
        out += [text[last:m.start()], f"[{kind.upper()}]"]
        last = m.end()
    return "".join(out) + text[last:]


def enforce_phi(report: dict[str, Any], action: str, where: str) -> None:
    if action != "fail" or not report["total"]:
        return
    found = ", ".join(f"{v['count']} {k} (rows {', '.join(map(str, v['example_rows']))})"
                      for k, v in report["by_type"].items())
    raise DataError(f"{where}: possible PHI/PII found: {found}; remove it, or set dataset.phi_action=redact "
                    "(replace with [TYPE]) or report")


_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def _norm(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def duplicates(texts: list[str]) -> dict[str, int]:
    """Exact duplicates, and near duplicates (equal once case, punctuation and spacing are ignored)."""
    exact = Counter(_digest(t) for t in texts)
    norm = Counter(_digest(_norm(t)) for t in texts)
    exact_extra = sum(c - 1 for c in exact.values())
    return {"exact": exact_extra, "near": sum(c - 1 for c in norm.values()) - exact_extra}


def overlap(train_pairs: list[tuple[str, str]], eval_pairs: list[tuple[str, str]]) -> dict[str, int]:
    """Eval examples whose whole text, or prompt alone, also occurs in training (normalised)."""
    train_full = {_digest(_norm(p + a)) for p, a in train_pairs}
    train_prompts = {_digest(_norm(p)) for p, _ in train_pairs if p}
    return {"eval_rows_in_train": sum(_digest(_norm(p + a)) in train_full for p, a in eval_pairs),
            "eval_prompts_in_train": sum(bool(p) and _digest(_norm(p)) in train_prompts for p, _ in eval_pairs)}
