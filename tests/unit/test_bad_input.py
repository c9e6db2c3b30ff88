"""Bad input through the real CLI: config, data, model, paths and environment mistakes (the table is
bad_input_cases.py). Every one must give exit code 2 and exactly one stderr line that names the
problem and the fix, no traceback, and leave the output root as it was (the previous run untouched,
no new run directory). Hardware is simulated by replacing medtune's probes (`setup.visible_gpus`,
the library version probe, `preflight.free_bytes`); everything else is real. The data stage's own
malformed-file table is tests/unit/test_data_errors.py; the table here holds what it does not cover.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from bad_input_cases import CASES, TINY_DATA, free_disk, gpus, sets  # the table (same folder)
from test_data_errors import CASES as DATA_CASES  # the data stage's own table (same folder)

from medtune.cli import main
from medtune.config_io import load_config
from medtune.errors import EnvironmentProblem


def base_args(tmp: Path, model: Path) -> list[str]:
    """A valid run of the tiny model on the tiny data; each case adds the one thing that is wrong."""
    good = ["model.model_source=local", f"model.local_model_path={model}", f"model.model_cache_dir={tmp / 'models'}",
            "dataset.dataset_source=local", f"dataset.local_dataset_path={TINY_DATA}", "dataset.dataset_format=jsonl",
            "dataset.eval_split=", f"output.output_root={tmp / 'outputs'}", "lora.quantization=none", "lora.bf16=false"]
    return ["run", "--preset", "smollm2-135m-medical", *sets(*good)(tmp, model)]


def previous_run(tmp: Path) -> None:
    """A complete earlier run under the output root: a refused command must leave it as it is."""
    run = tmp / "outputs" / "medical-finetune-earlier"
    (run / "adapters").mkdir(parents=True)
    (run / "adapters" / "adapter_config.json").write_text('{"r": 4}\n')
    (run / "manifest.json").write_text('{"status": "succeeded"}\n')


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash (folders: their mode), to compare before/after."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        state[rel] = f"dir {path.stat().st_mode:o}" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def arrange(name: str, tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    case = CASES[name]
    if name == "output-root-read-only" and os.geteuid() == 0:
        pytest.skip("root writes to read-only folders; the file-based output-root cases cover this check as root")
    previous_run(tmp)
    if case.inject:
        case.inject(monkeypatch)
    return base_args(tmp, model) + case.build(tmp, model)


def test_the_table_covers_every_kind_and_docs_state_its_size():
    kinds = Counter(case.kind for case in CASES.values())
    assert set(kinds) == {"config", "data", "model", "paths", "environment"} and len(CASES) >= 40
    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    assert f"**How many bad inputs were tried: {len(CASES) + len(DATA_CASES)}**" in doc
    rows = [[c.strip() for c in line.split("|")[1:3]] for line in doc.splitlines() if line.startswith("| ")]
    stated = {where: int(n) for where, n in rows if n.isdigit()}
    first = "tests/unit/bad_input_cases.py, run by test_bad_input.py"
    assert stated == {**{f"{kind} ({first if kind == 'config' else 'same file'})": n for kind, n in kinds.items()},
                      "data (tests/unit/test_data_errors.py)": len(DATA_CASES)}


def test_the_valid_base_passes_preflight(tmp_path, tiny_model_dir, monkeypatch):
    """Control: without the case's one mistake, the same arguments are accepted (so each case fails
    for its own reason), also on a simulated GPU with bitsandbytes and with plenty of disk."""
    from medtune.workflow import preflight as run_preflight

    args = base_args(tmp_path, tiny_model_dir)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    run_preflight(load_config(None, "smollm2-135m-medical", overrides))
    gpus()(monkeypatch)
    run_preflight(load_config(None, "smollm2-135m-medical", overrides + ["lora.quantization=4bit"]))
    free_disk(4 * 2**30)(monkeypatch)
    small = overrides + ["model.model_source=huggingface", "model.base_model_id=meta-llama/Llama-3.1-8B-Instruct"]
    run_preflight(load_config(None, "smollm2-135m-medical", small + ["output.merge_full_weights=false"]))
    merged = tmp_path / "outputs" / "medical-finetune-done" / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")  # a rerun of a merged run needs no room for another merge
    run_preflight(load_config(None, "smollm2-135m-medical", small + ["output.run_id=done"]))
    with pytest.raises(EnvironmentProblem, match="merged model needs about 15.0 GiB"):
        run_preflight(load_config(None, "smollm2-135m-medical", small + ["output.run_id=new"]))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.at_stage])
def test_bad_input_is_refused_with_one_line_and_nothing_written(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    args = arrange(name, tmp_path, tiny_model_dir, monkeypatch)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in CASES[name].expect:
        assert part in err, (part, err)
    assert snapshot(tmp_path) == before  # no run directory, the earlier run untouched, no cache folder


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.at_stage])
def test_bad_input_found_by_a_stage_leaves_no_stage_output(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A remote bucket is listed by the data stage: the run directory exists by then, but the refusal
    comes before any object is downloaded and no data/ (or later output) appears."""
    import fsspec

    args = arrange(name, tmp_path, tiny_model_dir, monkeypatch)
    earlier = snapshot(tmp_path / "outputs" / "medical-finetune-earlier")
    capsys.readouterr()
    try:
        assert main(args) == 2
    finally:
        fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    for part in CASES[name].expect:
        assert part in errors[0], (part, errors[0])
    run = next(p for p in (tmp_path / "outputs").iterdir() if p.name != "medical-finetune-earlier")
    assert not any((run / name).exists() for name in ("data", "adapters", "merged", "cache/bucket"))
    assert not list(tmp_path.rglob("escaped.jsonl"))
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    assert snapshot(tmp_path / "outputs" / "medical-finetune-earlier") == earlier


CONSOLE_CASES = ["unknown-key", "yaml-syntax", "model-no-config-json", "output-root-is-a-file", "bucket-path-dotdot"]


@pytest.mark.parametrize("name", CONSOLE_CASES)
def test_console_script_refuses_bad_input_the_same_way(name, tmp_path, tiny_model_dir, monkeypatch):
    """The installed `medtune` entry point, as a user runs it: same line, exit code 2, nothing written."""
    console = Path(sys.executable).with_name("medtune")
    if not console.is_file():
        pytest.skip("the medtune console script is not installed next to this Python")
    args = arrange(name, tmp_path, tiny_model_dir, monkeypatch)
    before = snapshot(tmp_path)
    proc = subprocess.run([str(console), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for part in CASES[name].expect:
        assert part in proc.stderr, (part, proc.stderr)
    assert snapshot(tmp_path) == before


# --- --debug ---------------------------------------------------------------------------------------


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    args = arrange("model-no-config-json", tmp_path, tiny_model_dir, monkeypatch)
    for argv in (args + ["--debug"], ["--debug", *args]):  # after the command, or before it (global)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "check_model_folder" in err, err
        assert err.strip().splitlines()[-1].startswith("error: model.local_model_path")


def test_unexpected_error_is_one_line_with_a_hint_and_exit_1(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A bug (not a MedtuneError) escaping a command: one line naming it and --debug, exit code 1."""
    import medtune.workflow

    def broken(cfg, on_this_machine=True):
        raise KeyError("stage_table\nsecond line")

    monkeypatch.setattr(medtune.workflow, "preflight", broken)
    args = base_args(tmp_path, tiny_model_dir)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: unexpected KeyError: 'stage_table") and "rerun with --debug" in err
    assert main(["--debug", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("error: unexpected KeyError")
    assert not (tmp_path / "outputs").exists()


def test_help_documents_debug(capsys):
    assert main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out
