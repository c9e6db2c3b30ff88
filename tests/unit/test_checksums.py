"""Base weights are hashed once: the digest is remembered by path, size and modification time."""

from __future__ import annotations

import hashlib
import os

from medtune import checksums


def test_digest_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "CACHE_MIN_BYTES", 0)  # real weights are gigabytes; these are bytes
    weights, cache = tmp_path / "model.safetensors", tmp_path / "cache"
    weights.write_bytes(b"a" * 1000)
    reads = []
    real = checksums.file_sha256
    monkeypatch.setattr(checksums, "file_sha256", lambda p: reads.append(p) or real(p))

    first = checksums.cached_sha256(weights, cache)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert checksums.cached_sha256(weights, cache) == first and len(reads) == 1  # from the cache

    weights.write_bytes(b"b" * 1000)  # same size: the modification time tells
    os.utime(weights, ns=(1, 1))
    assert checksums.cached_sha256(weights, cache) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(reads) == 2


def test_an_unwritable_cache_only_costs_the_rehash(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    assert checksums.cached_sha256(weights, blocker) == hashlib.sha256(b"x").hexdigest()


def test_deleted_files_are_forgotten(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "CACHE_MIN_BYTES", 0)
    cache = tmp_path / "cache"
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"1")
    new.write_bytes(b"2")
    checksums.cached_sha256(old, cache)
    old.unlink()
    checksums.cached_sha256(new, cache)
    import json
    assert list(json.loads((cache / checksums.DIGEST_CACHE).read_text())) == [str(new.resolve())]
