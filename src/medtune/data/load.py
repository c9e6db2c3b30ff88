"""Reading raw rows from the configured source into `datasets.Dataset` objects.

Sources: a Hub dataset, a bucket (fsspec URL, copied into the run's cache first), or a local file or
folder. Folders of data files may name their splits by file (`train.jsonl`, `heldout.jsonl`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from medtune.checksums import file_sha256
from medtune.config import DatasetConfig
from medtune.errors import DataError

log = logging.getLogger("medtune.data")

# file extension -> (datasets builder, config format family)
EXTENSIONS = {
    ".json": ("json", "json"), ".jsonl": ("json", "jsonl"), ".csv": ("csv", "csv"),
    ".parquet": ("parquet", "parquet"), ".arrow": ("arrow", "arrow"),
}
JSON_FAMILY = {"json", "jsonl"}


@dataclass
class RawData:
    train: Dataset
    eval: Dataset | None
    provenance: dict[str, object] = field(default_factory=dict)


def check_source(cfg: DatasetConfig) -> None:
    """Checks that need no download: run before the run directory is created."""
    if cfg.dataset_source == "local":
        path = Path(cfg.local_dataset_path).expanduser()
        if not path.exists():
            raise DataError(f"dataset.local_dataset_path {path} not found; point it at a data file or folder")
        if path.is_file() or not (cfg.dataset_format == "dataset" or _is_saved_dataset(path)):
            _data_files(path, cfg)


def load_raw(cfg: DatasetConfig, cache_dir: Path, token: str | None) -> RawData:
    if cfg.dataset_source == "huggingface":
        return _from_hub(cfg, cache_dir, token)
    if cfg.dataset_source == "bucket":
        local = _fetch_bucket(cfg, cache_dir)
        return _from_path(local, cfg, "dataset.dataset_bucket_path")
    return _from_path(Path(cfg.local_dataset_path).expanduser(), cfg, "dataset.local_dataset_path")


def _from_hub(cfg: DatasetConfig, cache_dir: Path, token: str | None) -> RawData:
    kwargs = {"name": cfg.dataset_config_name or None, "token": token, "cache_dir": str(cache_dir / "hf-datasets")}
    try:
        train = datasets.load_dataset(cfg.dataset_name, split=cfg.dataset_split, **kwargs)
        evald = datasets.load_dataset(cfg.dataset_name, split=cfg.eval_split, **kwargs) if cfg.eval_split else None
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        raise DataError(
            f"cannot load Hub dataset {cfg.dataset_name!r} ({type(exc).__name__}); check the id and network, "
            "or use dataset.dataset_source=local with dataset.local_dataset_path"
        ) from None
    except ValueError as exc:
        raise DataError(f"Hub dataset {cfg.dataset_name!r}: {exc}; check dataset.dataset_split / eval_split") from None
    return RawData(train, evald, {"source": "huggingface", "dataset": cfg.dataset_name,
                                  "fingerprint": train._fingerprint})


def _fetch_bucket(cfg: DatasetConfig, cache_dir: Path) -> Path:
    import fsspec

    url = f"{cfg.dataset_bucket.rstrip('/')}/{cfg.dataset_bucket_path.lstrip('/')}"
    target = cache_dir / "bucket" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if target.exists():
        return target / Path(cfg.dataset_bucket_path).name
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise DataError(f"dataset bucket path {url} does not exist; check dataset.dataset_bucket and dataset_bucket_path")
    tmp = target.with_name(target.name + ".tmp")
    fs.get(path, str(tmp / Path(path).name), recursive=fs.isdir(path))
    tmp.rename(target)
    return target / Path(path).name


def _from_path(path: Path, cfg: DatasetConfig, key: str) -> RawData:
    if not path.exists():
        raise DataError(f"{key} {path} not found; point it at a data file or folder")
    if path.is_dir() and (cfg.dataset_format == "dataset" or _is_saved_dataset(path)):
        return _from_saved(path, cfg)
    files = _data_files(path, cfg)
    split_files = {f.stem: f for f in files}
    if cfg.dataset_split in split_files:
        train_files = [split_files[cfg.dataset_split]]
    else:
        train_files = [f for f in files if f.stem != cfg.eval_split]
    eval_files = [split_files[cfg.eval_split]] if cfg.eval_split in split_files else []
    if cfg.eval_split and not eval_files:
        raise DataError(f"dataset.eval_split {cfg.eval_split!r}: no file {cfg.eval_split}.* in {path}; "
                        f"files there: {', '.join(f.name for f in files)}")
    builder = EXTENSIONS[files[0].suffix][0]
    train = _read_files(builder, train_files)
    evald = _read_files(builder, eval_files) if eval_files else None
    hashes = {str(f): file_sha256(f) for f in train_files + eval_files}
    return RawData(train, evald, {"source": str(path), "files": hashes})


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _from_saved(path: Path, cfg: DatasetConfig) -> RawData:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is not a saved dataset (no dataset_info/state.json); set dataset.dataset_format "
                        "to the format of its files") from None
    if isinstance(loaded, DatasetDict):
        if cfg.dataset_split not in loaded:
            raise DataError(f"split {cfg.dataset_split!r} not in {path}; it has: {', '.join(loaded)}; "
                            "set dataset.dataset_split")
        train = loaded[cfg.dataset_split]
        evald = loaded[cfg.eval_split] if cfg.eval_split in loaded else None
    else:
        train, evald = loaded, None
    return RawData(train, evald, {"source": str(path), "fingerprint": train._fingerprint})


def _data_files(path: Path, cfg: DatasetConfig) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"no data files ({', '.join(EXTENSIONS)}) in folder {path}; check the path")
        family = {"json": JSON_FAMILY, "jsonl": JSON_FAMILY}.get(cfg.dataset_format, {cfg.dataset_format})
        files = [f for f in files if EXTENSIONS[f.suffix][1] in family] or files
    for f in files:
        if f.suffix not in EXTENSIONS:
            raise DataError(f"{f}: unknown data file extension {f.suffix!r}; use one of {', '.join(EXTENSIONS)}")
        found = EXTENSIONS[f.suffix][1]
        same = found == cfg.dataset_format or {found, cfg.dataset_format} <= JSON_FAMILY
        if not same:
            raise DataError(f"{f} looks like {found} but dataset.dataset_format is {cfg.dataset_format}; "
                            f"set dataset.dataset_format={found}")
    return files


def _read_files(builder: str, files: list[Path]) -> Dataset:
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets wraps parser errors in several exception types
        cause = exc.__cause__ or exc
        raise DataError(f"cannot read {', '.join(map(str, files))}: {str(cause).splitlines()[0][:200]}; "
                        "fix the file") from None
    return ds

