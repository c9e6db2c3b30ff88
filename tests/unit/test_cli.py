import json
import subprocess
import sys

import pytest

from medtune.cli import main


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--set", "lora.lora_r=0"],
        ["run", "--set", "lora.lora_rank=8"],
        ["run", "--set", "dataset.local_dataset_path=/nonexistent/data.jsonl", "--set", "model.model_source=local",
         "--set", "model.local_model_path=/nonexistent"],
        ["config", "--config", "/nonexistent.yaml"],
        ["run", "--preset", "no-such-preset"],
    ],
)
def test_user_errors_exit_2_with_one_line(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_gpu_preset_on_a_cpu_machine_is_refused_up_front(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", "--preset", "llama3-8b-medical", "--set", f"output.output_root={tmp_path}"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before the run directory was created


def test_missing_dataset_file_is_one_line(tmp_path, tiny_model_dir, capsys):
    args = ["run", "--preset", "smollm2-135m-medical", "--set", "model.model_source=local",
            "--set", f"model.local_model_path={tiny_model_dir}", "--set", f"output.output_root={tmp_path}",
            "--set", f"dataset.local_dataset_path={tmp_path / 'missing.jsonl'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: dataset.local_dataset_path") and "not found" in err[-1]


def test_console_script_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "medtune", "run", "--set", "lora.lora_r=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: config key `lora.lora_r` = 0: Input should be greater than or equal to 1; "
                                   "set lora.lora_r to a valid value (LoRA rank)")


def test_config_json_masks_secret(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_in_env")
    assert main(["config", "--preset", "llama3-8b-medical", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["hf_token"] == "***"


def test_init_writes_commented_yaml(tmp_path):
    out = tmp_path / "m.yaml"
    assert main(["init", "--preset", "gemma-7b-medical", "-o", str(out)]) == 0
    text = out.read_text()
    assert "base_model_id: google/gemma-7b-it" in text and "# Hugging Face Hub repo id" in text
    assert main(["config", "--config", str(out)]) == 0


def test_presets_lists_all(capsys):
    assert main(["presets"]) == 0
    assert "smollm2-135m-medical" in capsys.readouterr().out
