from pathlib import Path

import pytest
import yaml

from medtune.config import MedtuneConfig
from medtune.presets import EMBEDDED_PRESET, PRESETS
from medtune.config_io import load_config, render_env, render_markdown, render_yaml, to_dict
from medtune.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_defaults_are_the_seed_defaults():
    c = MedtuneConfig()
    assert (c.infrastructure.cluster, c.infrastructure.container.source, c.infrastructure.output_bucket) == ("local", "none", "")
    assert c.infrastructure.container.finetune_path == "~/pw/singularity/finetune.sif"
    assert c.infrastructure.container.lfs_repo == "~/singularity-containers"
    assert (c.model.model_source, c.model.model_config_name) == ("huggingface", "llama3-8b-medical")
    assert c.model.base_model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert (c.model.local_model_path, c.model.model_cache_dir) == ("/models/Llama-3.1-8B-Instruct", "~/pw/models")
    d = c.dataset
    assert (d.dataset_source, d.dataset_name) == ("huggingface", "Shekswess/medical_llama3_instruct_dataset")
    # dataset_format: the seed's `json`; left unset, the loader infers the format from the extension
    assert (d.dataset_format, d.dataset_split, d.dataset_config_name, d.prompt_field, d.max_samples) == ("json", "train", "", "prompt", 0)
    t = c.training
    assert (t.num_epochs, t.learning_rate, t.micro_batch_size, t.gradient_accumulation, t.max_seq_length) == (3.0, 2e-4, 1, 16, 2048)
    lo = c.lora
    assert (lo.lora_r, lo.lora_alpha, lo.lora_dropout, lo.quantization) == (64, 16, 0.05, "4bit")
    assert (lo.gradient_checkpointing, lo.bf16, lo.packing) == (True, False, False)
    o = c.output
    assert (o.merge_full_weights, o.merged_save_format, o.push_to_hub, o.hub_model_id) == (True, "safetensors", False, "")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    cfg = load_config(preset=name, env={})
    assert cfg.model.model_config_name == name


def test_quick_preset_is_small():
    cfg = load_config(preset="llama3-8b-medical-quick", env={})
    assert (cfg.dataset.max_samples, cfg.training.num_epochs) == (500, 1.0)


def test_embedded_preset_points_at_bundled_data():
    cfg = load_config(preset=EMBEDDED_PRESET, env={})
    assert (Path(cfg.dataset.local_dataset_path) / "train.jsonl").is_file()
    assert (Path(cfg.dataset.local_dataset_path) / "heldout.jsonl").is_file()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.lora_rr=8", "did you mean `lora.lora_r`"),
        ("trainig.num_epochs=1", "did you mean `training`"),
        ("lora.quantization=2bit", "'4bit', '8bit' or 'none'"),
        ("lora.lora_r=0", "lora.lora_r"),
        ("training.learning_rate=-1", "training.learning_rate"),
        ("training.max_seq_length=10", "training.max_seq_length"),
        ("dataset.max_samples=many", "dataset.max_samples"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_values_are_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(preset=EMBEDDED_PRESET, overrides=[override], env={})
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_precedence_preset_then_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  model_config: smollm2-135m-medical\ntraining:\n  num_epochs: 5\n  seed: 7\n")
    cfg = load_config(f, overrides=["training.seed=9"], env={})
    assert cfg.model.model_source == "gguf"  # from the preset named in the file
    assert cfg.training.num_epochs == 5  # file beats preset
    assert cfg.training.seed == 9  # --set beats file


def test_token_comes_from_env_and_is_redacted():
    cfg = load_config(preset=EMBEDDED_PRESET, env={"HF_TOKEN": "hf_canary123"})
    assert cfg.model.hf_token.get_secret_value() == "hf_canary123"
    assert to_dict(cfg)["model"]["hf_token"] == "***"
    assert "hf_canary123" not in render_env(cfg) + render_yaml(cfg)


def test_token_from_file(tmp_path):
    f = tmp_path / "tok"
    f.write_text("hf_fromfile\n")
    cfg = load_config(preset=EMBEDDED_PRESET, overrides=[f"model.hf_token_file={f}"], env={})
    assert cfg.model.hf_token.get_secret_value() == "hf_fromfile"


def test_token_in_config_is_refused():
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        load_config(preset=EMBEDDED_PRESET, overrides=["model.hf_token=hf_x"], env={})


def test_init_yaml_round_trips(tmp_path):
    cfg = load_config(preset="mistral-7b-medical", overrides=["training.seed=3"], env={})
    f = tmp_path / "c.yaml"
    f.write_text(render_yaml(cfg))
    assert "# LoRA rank." in f.read_text()
    again = load_config(f, env={})
    # config.yaml writes the format the loader applies (`auto` when the key was not set): same behaviour
    assert again.dataset.format_to_use == cfg.dataset.format_to_use == "auto"
    first, second = to_dict(cfg), to_dict(again)
    first["dataset"].pop("dataset_format"), second["dataset"].pop("dataset_format")
    assert second == first
    assert yaml.safe_load(f.read_text())["lora"]["lora_r"] == 64


def test_docs_config_md_is_generated_from_schema():
    assert DOCS.read_text() == render_markdown(), "docs/config.md drifted: run `make docs`"


def test_dataset_format_is_inferred_unless_set_explicitly():
    implicit = load_config(preset=EMBEDDED_PRESET, overrides=["dataset.local_dataset_path=x.parquet"], env={})
    assert implicit.dataset.format_to_use == "auto"
    plain = MedtuneConfig.model_validate({"dataset": {"dataset_source": "local", "local_dataset_path": "x.csv"}})
    assert plain.dataset.dataset_format == "json" and plain.dataset.format_to_use == "auto"
    explicit = MedtuneConfig.model_validate({"dataset": {"dataset_source": "local", "local_dataset_path": "x.csv",
                                                         "dataset_format": "json"}})
    assert explicit.dataset.format_to_use == "json"


def test_embedded_heldout_split_only_applies_to_bundled_data():
    assert load_config(preset=EMBEDDED_PRESET, env={}).dataset.eval_split == "heldout"
    other = load_config(preset=EMBEDDED_PRESET, overrides=["dataset.local_dataset_path=/data/qa.jsonl"], env={})
    assert other.dataset.eval_split == ""
    named = load_config(preset=EMBEDDED_PRESET, overrides=["dataset.local_dataset_path=/d", "dataset.eval_split=test"], env={})
    assert named.dataset.eval_split == "test"


def test_an_inferred_dataset_format_survives_the_config_yaml_round_trip(tmp_path):
    """`--resume`, torchrun ranks and batch jobs reload config.yaml: an unset format must stay inferred
    (the seed's default `json` would refuse a CSV or Parquet dataset), a set one must stay set."""
    from medtune.config_io import render_yaml

    for overrides, expected in (([], "auto"), (["dataset.dataset_format=parquet"], "parquet")):
        cfg = load_config(preset="smollm2-135m-medical", overrides=overrides, env={})
        saved = tmp_path / "config.yaml"
        saved.write_text(render_yaml(cfg))
        assert load_config(config_file=saved, env={}).dataset.format_to_use == expected
