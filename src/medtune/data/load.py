"""Reading raw rows from the configured source into `datasets.Dataset` objects.

Sources: a Hub dataset (`datasets.load_dataset`, which also takes a local dataset folder), a bucket
(any fsspec URL; copied once into the run's cache), or a local path. A path may be one data file, a
folder of data files (all files of the format, also in sub-folders, hub-style `data/train-00000-of-00001.parquet`
included), or a `save_to_disk` folder (Dataset or DatasetDict). Splits of a folder are named by file:
`train.jsonl`, `heldout.jsonl`, `train-00000-of-00002.parquet`. The format comes from the file
extension unless `dataset.dataset_format` names it, and a file of another format is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from medtune.checksums import file_sha256
from medtune.config import DatasetConfig
from medtune.errors import DataError
from medtune.transfer import SUMS_NAME, Retry, get_verified, remote_sums, with_retries

log = logging.getLogger("medtune.data")

FORMAT_OF_SUFFIX = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
BUILDER = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}
JSON_FAMILY = {"json", "jsonl"}
SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
SAVED_MARKERS = ("dataset_dict.json", "state.json")


@dataclass
class RawData:
    train: Dataset
    eval: Dataset | None
    where: str  # what error messages name: the file or folder the rows came from
    files: list[Path] = field(default_factory=list)  # train files in row order (to name a JSONL line)
    provenance: dict[str, object] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """datasets' per-split progress bars, and its own ERROR line about a file it cannot parse, would bury
    medtune's one-line error (which names the file and the fix); medtune logs its own progress."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        ds_logger.setLevel(level)
        if was_on:
            ds_logging.enable_progress_bar()


def check_source(cfg: DatasetConfig) -> None:
    """Checks that need no download, run before the run directory exists: the path, the files'
    format, and (for data already on this machine) the rows themselves."""
    from medtune.data.validate import validate_rows

    with _quiet():
        raw = _local_raw(cfg)
        if raw is not None:
            validate_rows(raw, cfg)


def _local_raw(cfg: DatasetConfig) -> RawData | None:
    """The raw rows when they are on this machine already (None for remote buckets and Hub ids)."""
    if cfg.dataset_source == "bucket":
        url = bucket_url(cfg)
        fs, path = _filesystem(url)
        if "file" not in fs.protocol and "local" not in fs.protocol:
            return None  # remote: checked after the download
        return _from_path(Path(path), cfg, "dataset.dataset_bucket_path")
    if cfg.dataset_source == "local":
        return _from_path(Path(cfg.local_dataset_path).expanduser(), cfg, "dataset.local_dataset_path")
    if Path(cfg.dataset_name).expanduser().is_dir():
        return _from_hub(cfg, None)
    return None


def load_raw(cfg: DatasetConfig, cache_dir: Path, token: str | None) -> RawData:
    with _quiet():
        if cfg.dataset_source == "huggingface":
            return _from_hub(cfg, token)
        if cfg.dataset_source == "bucket":
            return _from_path(_fetch_bucket(cfg, cache_dir), cfg, "dataset.dataset_bucket_path")
        return _from_path(Path(cfg.local_dataset_path).expanduser(), cfg, "dataset.local_dataset_path")


def _from_hub(cfg: DatasetConfig, token: str | None) -> RawData:
    # datasets' own cache (HF_DATASETS_CACHE / HF_HOME): a Hub set is downloaded once per machine, not per run
    kwargs = {"name": cfg.dataset_config_name or None, "token": token}
    splits = [cfg.dataset_split] + ([cfg.eval_split] if cfg.eval_split else [])
    loaded = {}
    for split in splits:
        try:
            loaded[split] = datasets.load_dataset(cfg.dataset_name, split=split, **kwargs)
        except ValueError as exc:
            if "split" in str(exc).lower():
                raise DataError(f"Hub dataset {cfg.dataset_name!r} has no split {split!r} ({str(exc).splitlines()[0]}); "
                                "set dataset.dataset_split / dataset.eval_split to one it has") from None
            raise DataError(f"Hub dataset {cfg.dataset_name!r}: {str(exc).splitlines()[0]}; fix the dataset or its "
                            "dataset.dataset_config_name") from None
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            raise DataError(
                f"cannot load Hub dataset {cfg.dataset_name!r} ({type(exc).__name__}); check dataset.dataset_name and "
                "the network (gated sets need HF_TOKEN), or use dataset.dataset_source=local"
            ) from None
    train = loaded[cfg.dataset_split]
    hashes = {Path(f["filename"]).name: file_sha256(Path(f["filename"])) for f in train.cache_files}
    return RawData(train, loaded.get(cfg.eval_split) if cfg.eval_split else None, cfg.dataset_name, [],
                   {"source": "huggingface", "dataset": cfg.dataset_name, "files": hashes})


# --- buckets -------------------------------------------------------------------------------------

def bucket_url(cfg: DatasetConfig) -> str:
    return f"{cfg.dataset_bucket.rstrip('/')}/{cfg.dataset_bucket_path.lstrip('/')}"


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a bucket URL, or a one-line error naming the extra to install."""
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = {"s3": "'medtune[s3]'", "s3a": "'medtune[s3]'", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                   "abfs": "adlfs"}.get(protocol, f"the fsspec implementation for {protocol}://")
        fix = f"pip install {package}"
        raise DataError(f"dataset.dataset_bucket {url}: no filesystem for {protocol}:// installed; {fix}") from None
    except ValueError:
        raise DataError(f"dataset.dataset_bucket {url}: unknown protocol {protocol!r}; use s3://, gs://, az://, "
                        "file:// or a local folder") from None


DOWNLOAD_RETRY = Retry(attempts=4, backoff_s=2.0)


def _fetch_bucket(cfg: DatasetConfig, cache_dir: Path) -> Path:
    """Copy the bucket path (a file or a whole folder) into the run's cache once; return the local copy.
    Each file is retried on a transport error or a size/sha256 mismatch (see transfer.py)."""
    url = bucket_url(cfg)
    fs, remote = _filesystem(url)
    target = cache_dir / "bucket" / hashlib.sha256(url.encode()).hexdigest()[:16]
    local = target / Path(remote.rstrip("/")).name
    if target.is_dir():
        log.info("data: bucket %s already in the run's cache (%s)", url, local)
        return local
    if not fs.exists(remote):
        raise DataError(f"dataset bucket path {url} does not exist; check dataset.dataset_bucket and dataset_bucket_path")
    folder = fs.isdir(remote)
    files = [f for f in fs.find(remote) if Path(f).name != SUMS_NAME] if folder else [remote]
    rels = [Path(name).relative_to(remote) if folder else Path(Path(name).name) for name in files]
    escaping = [str(rel) for rel in rels if rel.is_absolute() or ".." in rel.parts]
    if escaping:  # an object key like `data/../../x` would be written outside the run's cache
        raise DataError(f"dataset bucket {url} holds objects whose names leave that folder ({escaping[0]}"
                        f"{f' and {len(escaping) - 1} more' if len(escaping) > 1 else ''}); rename or remove them "
                        "in the bucket")
    sums = remote_sums(fs, remote if folder else remote.rstrip("/").rsplit("/", 1)[0])
    sizes = [fs.size(f) or 0 for f in files]
    log.info("data: downloading %d file(s), %.1f MB, from %s (%s)", len(files), sum(sizes) / 1e6, url,
             f"sha256 checked against {SUMS_NAME}" if sums else f"sizes checked; no {SUMS_NAME} beside the data")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for i, (name, rel, size) in enumerate(zip(files, rels, sizes, strict=True), 1):
            dest = tmp / local.name / rel if folder else tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with_retries(lambda: get_verified(fs, name, dest, sums.get(rel.as_posix())),  # noqa: B023
                         f"data: download of {name}", DOWNLOAD_RETRY, DataError,
                         "check the bucket (endpoint, credentials, a corrupt copy) and rerun the same command")
            log.info("data: [%d/%d] %s (%.1f MB)", i, len(files), rel, size / 1e6)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-downloaded is left for a later run to trust
        raise
    tmp.rename(target)
    return local


# --- local paths ---------------------------------------------------------------------------------

def _from_path(path: Path, cfg: DatasetConfig, key: str) -> RawData:
    if not path.exists():
        raise DataError(f"{key} {path} not found; point it at a data file or folder")
    if path.is_dir() and _is_saved_dataset(path):
        if cfg.format_to_use not in ("auto", "dataset"):
            raise DataError(f"{path} is a saved dataset (save_to_disk) but dataset.dataset_format is "
                            f"{cfg.format_to_use}; set dataset.dataset_format=dataset (or auto)")
        return _from_saved(path, cfg)
    files = data_files(path, cfg)
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f), []).append(f)
    if cfg.dataset_split in by_split:
        train_files = by_split[cfg.dataset_split]
    else:
        train_files = [f for f in files if _split_of(f) != cfg.eval_split]
    eval_files = by_split.get(cfg.eval_split, []) if cfg.eval_split else []
    if cfg.eval_split and not eval_files:
        raise DataError(f"dataset.eval_split {cfg.eval_split!r}: no file {cfg.eval_split}.* in {path}; splits there: "
                        f"{', '.join(sorted(by_split))}; set dataset.eval_split to one of them or leave it empty")
    if not train_files:
        raise DataError(f"{path} holds only the eval split {cfg.eval_split!r}; add a training file")
    builder = BUILDER[_format_of(files[0])]
    train = _read_files(builder, train_files)
    evald = _read_files(builder, eval_files) if eval_files else None
    hashes = {(str(f.relative_to(path)) if path.is_dir() else f.name): file_sha256(f) for f in train_files + eval_files}
    return RawData(train, evald, str(path), train_files, {"source": str(path), "files": hashes})


def _split_of(path: Path) -> str:
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    match = SHARD.match(stem)
    return match["split"] if match else stem


def _is_saved_dataset(path: Path) -> bool:
    return any((path / m).is_file() for m in SAVED_MARKERS)


def _from_saved(path: Path, cfg: DatasetConfig) -> RawData:
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, json.JSONDecodeError, ValueError) as exc:
        raise DataError(f"{path} looks like a saved dataset but cannot be read ({str(exc).splitlines()[0][:120]}); "
                        "save it again with Dataset.save_to_disk") from None
    evald = None
    if isinstance(loaded, DatasetDict):
        if cfg.dataset_split not in loaded:
            raise DataError(f"split {cfg.dataset_split!r} not in {path}; it has: {', '.join(loaded)}; "
                            "set dataset.dataset_split")
        if cfg.eval_split and cfg.eval_split not in loaded:
            raise DataError(f"dataset.eval_split {cfg.eval_split!r} not in {path}; it has: {', '.join(loaded)}; "
                            "set dataset.eval_split to one of them or leave it empty")
        train = loaded[cfg.dataset_split]
        evald = loaded[cfg.eval_split] if cfg.eval_split else None
    else:
        train = loaded
        if cfg.eval_split:
            raise DataError(f"{path} is a single saved Dataset with no splits, so dataset.eval_split "
                            f"{cfg.eval_split!r} cannot be found; leave it empty and use dataset.eval_fraction")
    hashes = {str(Path(f["filename"]).resolve().relative_to(path.resolve())): file_sha256(Path(f["filename"]))
              for ds in (train, evald) if ds is not None for f in ds.cache_files}
    return RawData(train, evald, str(path), [], {"source": str(path), "files": hashes})


def data_files(path: Path, cfg: DatasetConfig) -> list[Path]:
    """The data files to read: `path` itself, or every file of the format under the folder."""
    if path.is_file():
        found = _format_of(path)
        if cfg.format_to_use == "dataset":
            raise DataError(f"{path} is a {found} file but dataset.dataset_format is dataset (a save_to_disk folder); "
                            f"set dataset.dataset_format={found}")
        _check_format(path, found, cfg)
        return [path]
    candidates = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FORMAT_OF_SUFFIX
                        and not p.name.startswith(("cache-", ".")))
    if not candidates:
        raise DataError(f"no data files ({', '.join(FORMAT_OF_SUFFIX)}) and no saved dataset in folder {path}; "
                        "check the path")
    wanted = cfg.format_to_use
    if wanted == "auto":
        kinds = {"json" if FORMAT_OF_SUFFIX[p.suffix] in JSON_FAMILY else FORMAT_OF_SUFFIX[p.suffix] for p in candidates}
        if len(kinds) > 1:
            raise DataError(f"folder {path} mixes formats ({', '.join(sorted(kinds))}); set dataset.dataset_format "
                            "to the one to train on")
        return candidates
    if wanted == "dataset":
        raise DataError(f"{path} is not a saved dataset (no dataset_dict.json or state.json); set "
                        f"dataset.dataset_format to the format of its files ({_format_of(candidates[0])})")
    files = [p for p in candidates if _same_family(FORMAT_OF_SUFFIX[p.suffix], wanted)]
    if not files:
        raise DataError(f"no {wanted} files in folder {path} (it has {', '.join(p.name for p in candidates[:5])}); "
                        f"set dataset.dataset_format={_format_of(candidates[0])}")
    return files


def _format_of(path: Path) -> str:
    if path.suffix not in FORMAT_OF_SUFFIX:
        raise DataError(f"{path}: unknown data file extension {path.suffix or '(none)'!r}; use one of "
                        f"{', '.join(FORMAT_OF_SUFFIX)} or a save_to_disk folder")
    return FORMAT_OF_SUFFIX[path.suffix]


def _same_family(found: str, wanted: str) -> bool:
    return found == wanted or {found, wanted} <= JSON_FAMILY


def _check_format(path: Path, found: str, cfg: DatasetConfig) -> None:
    if cfg.format_to_use != "auto" and not _same_family(found, cfg.format_to_use):
        raise DataError(f"{path} looks like {found} but dataset.dataset_format is {cfg.format_to_use}; "
                        f"set dataset.dataset_format={found} (or auto)")


def _read_files(builder: str, files: list[Path]) -> Dataset:
    if builder in ("json", "csv"):
        for f in files:
            _check_utf8(f)  # pyarrow's JSON reader lets invalid bytes into string columns
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets wraps parser errors in several exception types
        cause = exc.__cause__ or exc
        if builder == "json":
            for f in files:
                _locate_bad_json(f)
        empty = _without_rows(builder, files)
        if empty:  # datasets fails on these in its own internal words ("BatchSize must be greater than 0")
            raise DataError(f"{empty[0]} holds no rows; add rows or point the config at another file") from None
        first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
        raise DataError(f"cannot read {', '.join(map(str, files))} as {builder}: {first}; fix the file or "
                        "set dataset.dataset_format") from None


def _without_rows(builder: str, files: list[Path]) -> list[Path]:
    """CSV files with at most a header line, Parquet files whose footer counts zero rows."""
    if builder == "csv":
        return [f for f in files if len(f.read_text(errors="replace").strip().splitlines()) <= 1]
    if builder == "parquet":
        import pyarrow.parquet as pq

        empty = []
        for f in files:
            with contextlib.suppress(Exception):  # not readable as Parquet at all: the caller's message says so
                if pq.read_metadata(f).num_rows == 0:
                    empty.append(f)
        return empty
    return []


def _check_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None


def _locate_bad_json(path: Path) -> None:
    """Name the line of the first JSON error (datasets' own message does not)."""
    text = _check_utf8(path)
    if not text.strip():
        raise DataError(f"{path} is empty; add rows or point dataset.local_dataset_path elsewhere")
    try:
        json.loads(text)
        return  # one JSON document: datasets failed for another reason
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: bad JSON ({exc.msg} at column {exc.colno}); fix or remove line "
                            f"{number}") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: a JSON {type(value).__name__}, not an object; each line must be "
                            '{"column": value, ...}') from None
