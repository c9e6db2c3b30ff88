"""Content hashes for provenance (manifest.json) and verification of copies."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DIGEST_CACHE = "medtune-sha256.json"
CACHE_MIN_BYTES = 64 << 20  # smaller files are hashed faster than the cache file is rewritten


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a large, rarely changing file (base weights, GGUF), remembered in `cache_dir` by path,
    size and modification time: a 16 GB base is read once, not on every run (about a minute each)."""
    stat = path.stat()
    if stat.st_size < CACHE_MIN_BYTES:
        return file_sha256(path)
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    store = cache_dir / DIGEST_CACHE
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = file_sha256(path)
    known = {k: v for k, v in known.items() if Path(k).exists()}  # forget deleted runs and models
    known[key] = {"stamp": stamp, "sha256": digest}
    try:  # a read-only cache folder only costs the re-hash next time
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(store)
    except OSError:
        pass
    return digest
