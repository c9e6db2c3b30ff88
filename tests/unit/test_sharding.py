"""FSDP (`infrastructure.distributed=fsdp`): where it is refused, what the Trainer is given, the 4-bit
storage dtype, the loopback-only torchrun command line, and `medtune plan`'s per-GPU figures."""

from __future__ import annotations

import pytest

from medtune.cli import main
from medtune.config_io import load_config
from medtune.errors import ConfigError, EnvironmentProblem
from medtune.launch.torchrun import WorldPlan, plan_world, torchrun_command
from medtune.plan import make_plan
from medtune.rundir import RunDir

FSDP = "infrastructure.distributed=fsdp"


def _cfg(*sets: str):
    return load_config(preset="llama3-8b-medical", overrides=list(sets), env={})


@pytest.mark.parametrize("sets, says", [
    (["training.device=cpu"], "needs CUDA GPUs (accelerate does not shard CPU processes)"),
    (["infrastructure.num_gpus=1"], "infrastructure.num_gpus is 1; use 2 or more"),
    (["lora.quantization=8bit"], "not 8-bit ones; set lora.quantization=4bit or none"),
])
def test_fsdp_refused_in_the_config_where_it_cannot_shard(sets, says):
    with pytest.raises(ConfigError, match="infrastructure.distributed=fsdp") as err:
        _cfg(FSDP, *sets)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_fsdp_accepted_where_it_shards():
    assert _cfg(FSDP).infrastructure.distributed == "fsdp"
    assert _cfg(FSDP, "infrastructure.num_gpus=1", "infrastructure.cluster=slurm", "infrastructure.slurm.nodes=2")
    assert _cfg().infrastructure.distributed == "ddp"


@pytest.mark.parametrize("visible", [0, 1])
def test_fsdp_refused_at_launch_without_two_gpus(visible):
    with pytest.raises(EnvironmentProblem, match=f"2 or more CUDA GPUs but {visible} GPU"):
        plan_world(_cfg(FSDP), visible_gpus=visible)
    assert plan_world(_cfg(FSDP), visible_gpus=2) == WorldPlan(2, 1, "nccl")


def test_single_node_torchrun_stays_on_loopback(tmp_path):
    cmd = torchrun_command(_cfg(), RunDir(tmp_path / "r"), WorldPlan(2, 1, "nccl"), python="python3")
    assert "--local-addr=127.0.0.1" in cmd
    assert any(a.startswith("--rdzv-endpoint=127.0.0.1:") for a in cmd)
    multi = _cfg("infrastructure.cluster=slurm", "infrastructure.slurm.nodes=2", "infrastructure.rdzv_endpoint=n1:29500")
    assert "--local-addr=127.0.0.1" not in torchrun_command(multi, RunDir(tmp_path / "r"), WorldPlan(2, 2, "nccl"))


@pytest.mark.parametrize("quantization, host_loading", [("4bit", False), ("none", True)])
def test_trainer_gets_fsdp_full_shard_per_decoder_layer(tmp_path, monkeypatch, quantization, host_loading):
    from medtune.train import training_args

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "unset")  # TrainingArguments writes it; restored after
    cfg = _cfg(FSDP, f"lora.quantization={quantization}", "lora.gradient_checkpointing=true", "training.device=auto")
    args = training_args(cfg, RunDir(tmp_path), "cpu", has_eval=False)
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": host_loading, "state_dict_type": "FULL_STATE_DICT"}
    # Liger's fused linear + cross-entropy bypasses FSDP's gathering of lm_head (crashed on 2 x H200)
    assert args.liger_kernel_config == {"fused_linear_cross_entropy": False, "cross_entropy": False}
    plain = training_args(_cfg(), RunDir(tmp_path), "cpu", has_eval=False)
    assert plain.fsdp_plugin_args is None and plain.liger_kernel_config is None


@pytest.mark.parametrize("strategy, storage", [("fsdp", "compute"), ("ddp", "uint8")])
def test_qlora_weights_are_stored_in_the_compute_dtype_under_fsdp(tiny_model_dir, strategy, storage):
    import torch

    from medtune.train import compute_dtype, load_for_training

    cfg = load_config(overrides=["model.model_source=local", f"model.local_model_path={tiny_model_dir}",
                                 "lora.quantization=4bit", "lora.lora_r=4", f"infrastructure.distributed={strategy}"])
    model = load_for_training(cfg, str(tiny_model_dir), "cpu")
    quantized = [p for n, p in model.named_parameters() if "base_layer" in n and type(p).__name__ == "Params4bit"]
    assert len(quantized) == 2 * 7  # 2 layers x 7 projections
    expected = compute_dtype(cfg, "cpu") if storage == "compute" else torch.uint8
    assert {p.dtype for p in quantized} == {expected}


def test_plan_shows_fsdp_memory_per_gpu(capsys):
    def plan(*sets):
        return make_plan(load_config(preset="llama3-8b-medical", overrides=[
            "model.base_model_id=meta-llama/Llama-3.1-70B-Instruct", "model.model_cache_dir=/nonexistent", *sets],
            env={}), gpu="A100-80GB", rows=1000)

    whole, two, eight = plan(), plan(FSDP, "infrastructure.num_gpus=2"), plan(FSDP, "infrastructure.num_gpus=8")
    assert whole["fsdp"] is None and "gathered" not in whole["memory_gib"]
    w1, w2, w8 = (p["memory_gib"]["weights"] for p in (whole, two, eight))
    constants = 68_451_041_280 * 0.127 / 8 / 2**30  # the absmax bits, whole on every GPU
    assert w2 - constants == pytest.approx((w1 - constants) / 2, abs=0.01)  # the plan rounds to 0.01 GiB
    assert w8 - constants == pytest.approx((w1 - constants) / 8, abs=0.01)
    lora = [p["memory_gib"]["lora_and_optimizer"] for p in (whole, two, eight)]
    assert lora[1] == pytest.approx(lora[0] / 2, abs=0.01) and lora[2] == pytest.approx(lora[0] / 8, abs=0.01)
    assert whole["memory_gib"]["total"] > two["memory_gib"]["total"] > eight["memory_gib"]["total"]
    # Loading QLoRA quantizes the whole base on each GPU: the same peak whatever the GPU count.
    assert two["fsdp"]["load_peak_gib"] == eight["fsdp"]["load_peak_gib"] > eight["memory_gib"]["total"]
    assert eight["request"]["gpus"] == 8 and "#SBATCH --gres=gpu:8" in eight["request"]["slurm"]
    assert plan(FSDP, "lora.quantization=none", "infrastructure.num_gpus=2")["fsdp"]["load_peak_gib"] is None
    assert main(["plan", "--preset", "llama3-8b-medical", "--set", FSDP, "--set", "infrastructure.num_gpus=4"]) == 0
    assert "FSDP        base sharded over 4 GPUs" in capsys.readouterr().out
