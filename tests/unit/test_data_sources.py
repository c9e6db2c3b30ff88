"""Every dataset source × format: local files and folders, saved datasets, buckets (file://, a bare
folder, and s3:// against a real moto server on 127.0.0.1), and Hub-style loading from a local path."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from medtune.config import DatasetConfig
from medtune.data.load import check_source, load_raw
from tests_support import SHARED_DATASET

ROWS = [{"instruction": f"Question {i} about anaemia?", "input": "", "output": f"Answer {i}."} for i in range(6)]
HELD = [{"instruction": "Held-out question?", "input": "", "output": "Held-out answer."}]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_list(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "arrow":
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
    return path


def local(path: Path, **kw) -> DatasetConfig:
    return DatasetConfig(dataset_source="local", local_dataset_path=str(path), **kw)


def outputs(raw) -> list[str]:
    return sorted(raw.train["output"])


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet", "arrow"])
@pytest.mark.parametrize("given", [True, False])
def test_local_file_each_format(tmp_path, fmt, given):
    path = write(tmp_path / f"qa.{fmt}", ROWS, fmt)
    cfg = local(path, **({"dataset_format": fmt} if given else {}))
    check_source(cfg)
    raw = load_raw(cfg, tmp_path / "cache", None)
    assert outputs(raw) == sorted(r["output"] for r in ROWS)
    assert raw.provenance["files"] == {path.name: pytest.approx(raw.provenance["files"][path.name])}
    assert len(raw.provenance["files"][path.name]) == 64


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_folder_reads_every_file_and_named_eval_split(tmp_path, fmt):
    write(tmp_path / "d" / f"train-00000-of-00002.{fmt}", ROWS[:3], fmt)
    write(tmp_path / "d" / f"train-00001-of-00002.{fmt}", ROWS[3:], fmt)
    write(tmp_path / "d" / f"heldout.{fmt}", HELD, fmt)
    raw = load_raw(local(tmp_path / "d", eval_split="heldout"), tmp_path / "cache", None)
    assert outputs(raw) == sorted(r["output"] for r in ROWS)  # both shards, not files[0]
    assert raw.eval["output"] == ["Held-out answer."]


def test_hub_style_folder_with_data_subfolder(tmp_path):
    write(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", ROWS, "parquet")
    (tmp_path / "repo" / "README.md").write_text("# a dataset card\n")
    raw = load_raw(local(tmp_path / "repo", dataset_format="parquet"), tmp_path / "cache", None)
    assert len(raw.train) == len(ROWS)


def test_saved_dataset_and_dataset_dict(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": Dataset.from_list(ROWS), "validation": Dataset.from_list(HELD)}).save_to_disk(str(tmp_path / "dd"))
    single = load_raw(local(tmp_path / "single", dataset_format="dataset"), tmp_path / "c", None)
    assert len(single.train) == len(ROWS) and single.eval is None
    dd = load_raw(local(tmp_path / "dd", eval_split="validation"), tmp_path / "c", None)  # format inferred
    assert len(dd.train) == len(ROWS) and dd.eval["output"] == ["Held-out answer."]
    assert all(len(h) == 64 for h in dd.provenance["files"].values())


def test_huggingface_source_through_load_dataset_from_a_local_path(tmp_path):
    write(tmp_path / "hub" / "train.jsonl", ROWS, "jsonl")
    write(tmp_path / "hub" / "test.jsonl", HELD, "jsonl")
    cfg = DatasetConfig(dataset_source="huggingface", dataset_name=str(tmp_path / "hub"), eval_split="test")
    check_source(cfg)
    raw = load_raw(cfg, tmp_path / "cache", None)
    assert outputs(raw) == sorted(r["output"] for r in ROWS) and raw.eval["output"] == ["Held-out answer."]
    assert raw.provenance["source"] == "huggingface" and raw.provenance["files"]


@pytest.mark.parametrize("style", ["file-url", "bare-folder"])
def test_bucket_local_folder_is_copied_once_into_the_cache(tmp_path, style):
    bucket = tmp_path / "bucket"
    write(bucket / "medical" / "part-a.jsonl", ROWS[:2], "jsonl")
    write(bucket / "medical" / "part-b.jsonl", ROWS[2:], "jsonl")
    url = f"file://{bucket}" if style == "file-url" else str(bucket)
    cfg = DatasetConfig(dataset_source="bucket", dataset_bucket=url, dataset_bucket_path="medical")
    check_source(cfg)
    raw = load_raw(cfg, tmp_path / "cache", None)
    assert outputs(raw) == sorted(r["output"] for r in ROWS)
    copies = list((tmp_path / "cache" / "bucket").rglob("*.jsonl"))
    assert len(copies) == 2
    (bucket / "medical" / "part-a.jsonl").unlink()  # a second load uses the cached copy
    assert len(load_raw(cfg, tmp_path / "cache", None).train) == len(ROWS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, reached through s3fs like any bucket."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    import s3fs

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"medtune-{_free_port()}"
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_s3_bucket_folder_all_files(tmp_path, s3, fmt):
    fs, bucket = s3
    for i, part in enumerate((ROWS[:4], ROWS[4:])):
        fs.put_file(str(write(tmp_path / f"p{i}.{fmt}", part, fmt)), f"{bucket}/med/p{i}.{fmt}")
    cfg = DatasetConfig(dataset_source="bucket", dataset_bucket=f"s3://{bucket}", dataset_bucket_path="med")
    check_source(cfg)  # remote: nothing to check without a download
    raw = load_raw(cfg, tmp_path / "cache", None)
    assert outputs(raw) == sorted(r["output"] for r in ROWS)


def test_s3_missing_path_is_a_data_error(tmp_path, s3):
    from medtune.errors import DataError

    _, bucket = s3
    cfg = DatasetConfig(dataset_source="bucket", dataset_bucket=f"s3://{bucket}", dataset_bucket_path="nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_raw(cfg, tmp_path / "cache", None)


# --- the real shared dataset (skipped when ../shared is absent) ---------------------------------------

needs_shared = pytest.mark.skipif(not SHARED_DATASET.is_dir(), reason="../shared/datasets not present")


def _check_shared(raw) -> None:
    assert len(raw.train) == 1800
    assert set(raw.train.column_names) == {"instruction", "input", "output", "prompt"}
    assert raw.train[0]["prompt"].startswith("<s>[INST] ")


@needs_shared
def test_shared_dataset_local(tmp_path):
    cfg = local(SHARED_DATASET, dataset_format="dataset")
    check_source(cfg)
    _check_shared(load_raw(cfg, tmp_path / "cache", None))


@needs_shared
def test_shared_dataset_bucket_file_url(tmp_path):
    cfg = DatasetConfig(dataset_source="bucket", dataset_bucket=f"file://{SHARED_DATASET.parent}",
                        dataset_bucket_path=SHARED_DATASET.name)
    check_source(cfg)
    _check_shared(load_raw(cfg, tmp_path / "cache", None))


@needs_shared
def test_shared_dataset_bucket_s3(tmp_path, s3):
    fs, bucket = s3
    fs.put(str(SHARED_DATASET), f"{bucket}/datasets/", recursive=True)
    cfg = DatasetConfig(dataset_source="bucket", dataset_bucket=f"s3://{bucket}",
                        dataset_bucket_path=f"datasets/{SHARED_DATASET.name}")
    _check_shared(load_raw(cfg, tmp_path / "cache", None))


def test_huggingface_split_not_found_names_the_split(tmp_path):
    from medtune.errors import DataError

    write(tmp_path / "hub" / "train.jsonl", ROWS, "jsonl")
    cfg = DatasetConfig(dataset_source="huggingface", dataset_name=str(tmp_path / "hub"), eval_split="validation")
    with pytest.raises(DataError, match="has no split 'validation'.*set dataset.dataset_split / dataset.eval_split"):
        check_source(cfg)
