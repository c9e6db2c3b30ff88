"""Batch scripts (line by line against the config), torchrun command lines, world plans, signals."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from medtune.cli import main
from medtune.config_io import load_config
from medtune.errors import ConfigError, EnvironmentProblem, RunDirError
from medtune.launch import pbs, slurm
from medtune.launch.submit import for_scheduler
from medtune.launch.torchrun import WorldPlan, narrowed_devices, plan_world, torchrun_command, train_in_subprocess
from medtune.preemption import StopOnSignal, last_complete_checkpoint, remove_incomplete_checkpoints
from medtune.resume import find_run
from medtune.rundir import RunDir
from medtune.status import run_status

PY = "/opt/venv/bin/python"


def _cfg(*sets: str):
    return load_config(preset="llama3-8b-medical", overrides=list(sets), env={})


def _directives(script: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix + " ") for line in script.splitlines() if line.startswith(prefix + " ")]


def test_pbs_script_line_by_line(tmp_path):
    cfg = for_scheduler(_cfg("infrastructure.pbs.account=med42", "infrastructure.pbs.queue=gpuq",
                             "infrastructure.pbs.walltime=12:00:00", "infrastructure.pbs.select=2:ncpus=16:ngpus=4",
                             "infrastructure.pbs.extra_directives=['-l mem=128gb', '-m abe']", "output.run_id=r1",
                             f"output.output_root={tmp_path}"), "pbs")
    run = RunDir.for_run(tmp_path, "r1")
    script = pbs.render(cfg, run, PY, Path("/work"))
    assert script.startswith("#!/bin/bash\n")
    assert _directives(script, "#PBS") == [
        "-N medtune", f"-o {run.logs}/pbs.out", "-j oe", "-r y", "-V", "-A med42", "-q gpuq", "-l walltime=12:00:00",
        "-l select=2:ncpus=16:ngpus=4", "-l mem=128gb", "-m abe"]
    body = script.splitlines()
    assert "cd /work" in body
    assert 'head_node=$(head -n 1 "$PBS_NODEFILE")' in body  # two chunks: rendezvous on the first node
    assert (f'{PY} -m medtune run --resume {run.root} --set "infrastructure.rdzv_endpoint=${{head_node}}:29500" &'
            in body)
    assert any('qrerun "$PBS_JOBID"' in line for line in body)
    assert cfg.infrastructure.cluster == "pbs" and cfg.infrastructure.pbs.chunks == 2


def test_pbs_single_chunk_has_no_rendezvous(tmp_path):
    cfg = for_scheduler(_cfg("output.run_id=r2"), "pbs")
    script = pbs.render(cfg, RunDir.for_run(tmp_path, "r2"), PY, Path("/work"))
    assert "-l select=1:ncpus=8:ngpus=1" in _directives(script, "#PBS")
    assert "-A" not in " ".join(_directives(script, "#PBS")) and "head_node" not in script


def test_slurm_script_line_by_line(tmp_path):
    cfg = for_scheduler(_cfg("infrastructure.slurm.account=proj", "infrastructure.slurm.partition=gpu",
                             "infrastructure.slurm.qos=high", "infrastructure.slurm.cpus_per_task=16",
                             "infrastructure.slurm.time=2-00:00:00", "infrastructure.slurm.gres=gpu:4",
                             "infrastructure.slurm.nodes=2", "infrastructure.slurm.extra_directives=['--mem=0']",
                             "output.run_id=s1"), "slurm")
    run = RunDir.for_run(tmp_path, "s1")
    script = slurm.render(cfg, run, PY, Path("/work"))
    assert _directives(script, "#SBATCH") == [
        "--job-name=medtune-s1", f"--output={run.logs}/slurm-%j.out", "--open-mode=append", "--account=proj",
        "--partition=gpu", "--qos=high", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16",
        "--time=2-00:00:00", "--gres=gpu:4", "--requeue", "--signal=B:USR1@300", "--mem=0"]
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_defaults_leave_out_empty_settings(tmp_path):
    cfg = for_scheduler(_cfg("infrastructure.slurm.signal_seconds=0", "output.run_id=s2"), "slurm")
    options = _directives(slurm.render(cfg, RunDir.for_run(tmp_path, "s2"), PY, Path("/w")), "#SBATCH")
    assert not [o for o in options if o.startswith(("--account", "--partition", "--qos", "--gres", "--signal"))]


def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_batch_shell_forwards_the_warning_and_requeues_on_75(tmp_path):
    """The script's own logic, run by bash: SIGUSR1 reaches medtune, exit 75 calls scontrol requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "fakepython", f"trap 'echo got-usr1 > {tmp_path}/medtune.txt; exit 75' USR1\n"
                                     f"touch {tmp_path}/trap-set\nwhile true; do sleep 0.1; done")
    _fake_bin(bin_dir, "scontrol", f'echo "$@" > {tmp_path}/requeue.txt')
    cfg = for_scheduler(_cfg("output.run_id=s3"), "slurm")
    script = tmp_path / "job.sh"
    script.write_text(slurm.render(cfg, RunDir.for_run(tmp_path, "s3"), str(bin_dir / "fakepython"), tmp_path))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(["bash", str(script)], env=env)
    deadline = time.monotonic() + 10
    # the stand-in must have installed its trap, or the signal kills it before it can answer
    while not (tmp_path / "trap-set").exists() or not any(
            "fakepython" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=10) == 75
    assert (tmp_path / "medtune.txt").read_text().strip() == "got-usr1"
    assert (tmp_path / "requeue.txt").read_text().strip() == "requeue 4242"


def test_torchrun_single_node_rendezvous_on_loopback(tmp_path):
    run = RunDir.for_run(tmp_path, "t1")
    cmd = torchrun_command(_cfg(), run, WorldPlan(4, 1, "nccl"), python=PY)
    assert cmd[:6] == [PY, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=4", "--rdzv-backend=c10d"]
    assert "--rdzv-id=t1" in cmd and any(a.startswith("--rdzv-endpoint=127.0.0.1:") for a in cmd)
    assert cmd[-3:] == ["--module", "medtune.launch.worker", str(run.root)]


def test_torchrun_multi_node_under_slurm_and_pbs(tmp_path):
    run = RunDir.for_run(tmp_path, "t2")
    cfg = _cfg("infrastructure.cluster=slurm", "infrastructure.slurm.nodes=2",
               "infrastructure.rdzv_endpoint=node001:29500")
    cmd = torchrun_command(cfg, run, plan_world(cfg, visible_gpus=4), python=PY)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--nnodes=2" in cmd and "--nproc-per-node=4" in cmd and "--rdzv-endpoint=node001:29500" in cmd
    cfg = _cfg("infrastructure.cluster=pbs", "infrastructure.pbs.select=3:ncpus=8:ngpus=2",
               "infrastructure.rdzv_endpoint=n1:29500")
    cmd = torchrun_command(cfg, run, plan_world(cfg, visible_gpus=2), python=PY)
    assert cmd[:3] == ["pbsdsh", "-u", "--"] and "--nnodes=3" in cmd
    with pytest.raises(EnvironmentProblem, match="rdzv_endpoint"):
        torchrun_command(_cfg("infrastructure.cluster=slurm", "infrastructure.slurm.nodes=2"), run,
                         WorldPlan(1, 2, "nccl"))


def test_world_plans():
    assert plan_world(_cfg(), visible_gpus=8) == WorldPlan(8, 1, "nccl")
    assert plan_world(_cfg("infrastructure.num_gpus=2"), visible_gpus=8) == WorldPlan(2, 1, "nccl")
    assert plan_world(_cfg(), visible_gpus=1).distributed is False
    assert plan_world(_cfg("infrastructure.cpu_processes=2"), visible_gpus=0) == WorldPlan(2, 1, "gloo")
    assert plan_world(_cfg("training.device=cpu"), visible_gpus=4) == WorldPlan(1, 1, "gloo")
    with pytest.raises(EnvironmentProblem, match="only 2 GPU"):
        plan_world(_cfg("infrastructure.num_gpus=4"), visible_gpus=2)
    with pytest.raises(EnvironmentProblem, match="no CUDA GPU"):
        plan_world(_cfg("infrastructure.num_gpus=2"), visible_gpus=0)
    with pytest.raises(ConfigError, match="num_gpus"):
        _cfg("infrastructure.num_gpus=0")
    with pytest.raises(ConfigError, match="select"):
        _cfg("infrastructure.pbs.select=ncpus=8")


def test_a_run_on_fewer_gpus_than_visible_sees_only_those(tmp_path, monkeypatch):
    """num_gpus=1 on a 2-GPU node: the Trainer would take a lone process seeing 2 GPUs for
    DataParallel (the loss came out doubled on 2 H200s), so training runs in a process shown 1 GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert narrowed_devices(WorldPlan(1, 1, "nccl"), visible_gpus=2) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert narrowed_devices(WorldPlan(2, 1, "nccl"), visible_gpus=2) == {}
    assert narrowed_devices(WorldPlan(2, 1, "gloo"), visible_gpus=0) == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,7")  # a scheduler's allocation: keep its numbering
    assert narrowed_devices(WorldPlan(2, 1, "nccl"), visible_gpus=3) == {"CUDA_VISIBLE_DEVICES": "3,5"}

    run = RunDir.for_run(tmp_path, "narrow").create()
    child = ("import os, sys, pathlib; from medtune.rundir import RunDir; "
             "RunDir(pathlib.Path(sys.argv[1])).update_manifest(training={'seen': os.environ['CUDA_VISIBLE_DEVICES']})")
    plan = WorldPlan(1, 1, "nccl")
    seen = train_in_subprocess(_cfg(), run, plan, [sys.executable, "-c", child, str(run.root)],
                               narrowed_devices(plan, visible_gpus=3))
    assert seen == {"seen": "3"}


def test_sigusr1_stops_at_the_next_step_with_a_checkpoint():
    stopper = StopOnSignal().install()
    try:
        args, state = SimpleNamespace(world_size=1), SimpleNamespace(global_step=7)
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        stopper.on_step_end(args, state, control)
        assert not control.should_save and stopper.stopped_at is None
        os.kill(os.getpid(), signal.SIGUSR1)
        stopper.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and stopper.stopped_at == 7
        assert stopper.signal_name == "SIGUSR1"
    finally:
        stopper.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def _checkpoint(folder: Path, step: int, complete: bool, loss: float = 1.5) -> None:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        state = {"global_step": step, "max_steps": 50, "log_history": [{"step": step, "loss": loss}]}
        (path / "trainer_state.json").write_text(json.dumps(state))


def test_resume_skips_a_checkpoint_cut_off_mid_save(tmp_path):
    _checkpoint(tmp_path, 5, True)
    _checkpoint(tmp_path, 10, True)
    _checkpoint(tmp_path, 15, False)
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"
    remove_incomplete_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-5"]


def test_status_from_checkpoint_and_log(tmp_path):
    run = RunDir.for_run(tmp_path, "st").create()
    run.update_manifest(status="running", stages={s: {"status": "done"} for s in ("setup", "container", "model", "data")})
    _checkpoint(run.checkpoints, 20, True, loss=2.25)
    info = run_status(run)
    assert (info["stage"], info["step"], info["total_steps"], info["last_loss"]) == ("finetune", 20, 50, 2.25)
    run.log_file.write_text("12:00:00 INFO medtune.train: step 23/50 loss 2.1000 lr 1e-4 10 tok/s eta 00:10\n")
    assert (run_status(run)["step"], run_status(run)["last_loss"]) == (23, 2.1)
    assert "job_state" not in info


def test_find_run_by_id_or_directory(tmp_path):
    run = RunDir.for_run(tmp_path, "abc").create()
    run.config_yaml.write_text("{}\n")
    assert find_run("abc", str(tmp_path)) == run == find_run(str(run.root))
    assert find_run("medical-finetune-abc", str(tmp_path)) == run
    with pytest.raises(RunDirError, match="no run 'zzz'"):
        find_run("zzz", str(tmp_path))


def test_resume_refuses_a_second_config(capsys):
    assert main(["run", "--resume", "x", "--preset", "llama3-8b-medical"]) == 2
    assert "--resume reloads the run's own config.yaml" in capsys.readouterr().err


def test_submit_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    args = ["submit", "--scheduler", "slurm", "--preset", "llama3-8b-medical", "--dry-run",
            "--set", f"output.output_root={tmp_path}", "--set", "output.run_id=dry"]
    assert main(args) == 0
    assert "#SBATCH --job-name=medtune-dry" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_status_command_prints_the_run(tmp_path, capsys):
    run = RunDir.for_run(tmp_path, "cli").create()
    run.config_yaml.write_text("{}\n")
    run.update_manifest(status="preempted", stages={s: {"status": "done"} for s in ("setup", "container", "model", "data")})
    _checkpoint(run.checkpoints, 12, True, loss=0.75)
    assert main(["status", "cli", "--set", f"output.output_root={tmp_path}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["status"], info["stage"], info["step"], info["last_loss"]) == ("preempted", "finetune", 12, 0.75)
    assert main(["status", str(run.root)]) == 0 and "preempted" in capsys.readouterr().out
    assert main(["status", "nope", "--set", f"output.output_root={tmp_path}"]) == 2


def test_submit_without_the_scheduler_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    args = ["submit", "--scheduler", "pbs", "--preset", "smollm2-135m-medical", "--set", f"output.output_root={tmp_path}",
            "--set", "model.model_source=local", "--set", f"model.local_model_path={tiny_model_dir}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: qsub not found") and err.count("\n") == 1
    assert not any(tmp_path.glob("medical-finetune-*"))
