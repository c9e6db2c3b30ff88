"""Data-parallel training on every GPU of a node (or of several nodes) under torchrun.

Only the finetune stage is relaunched: setup, model and data run once in the `medtune run`
process before it, merge and validation once after it. Each rank runs `medtune.launch.worker`,
which reads the run's config.yaml and the prepared model and data from the run directory, so the
ranks and the parent share nothing but files. A signal to the parent (SIGTERM/SIGUSR1 from a
scheduler) is passed to every rank as SIGUSR1, so they checkpoint at the same step and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import psutil

from medtune.config import MedtuneConfig
from medtune.errors import EnvironmentProblem, MedtuneError
from medtune.preemption import STOP_SIGNALS, Preempted
from medtune.rundir import RunDir

log = logging.getLogger("medtune.launch")

RDZV_PORT = 29500
WORKER_MODULE = "medtune.launch.worker"


@dataclass(frozen=True)
class WorldPlan:
    nproc_per_node: int
    nnodes: int
    backend: str  # "nccl" on GPUs, "gloo" on CPUs

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def plan_world(cfg: MedtuneConfig, visible_gpus: int) -> WorldPlan:
    """How many processes train: one per GPU used on each node, or `cpu_processes` on the CPU."""
    plan = _world(cfg, visible_gpus)
    if cfg.infrastructure.distributed == "fsdp" and (plan.backend == "gloo" or not plan.distributed):
        # Refused rather than run unsharded: FSDP is chosen for a base that does not fit one device.
        raise EnvironmentProblem(
            f"infrastructure.distributed=fsdp shards the base over 2 or more CUDA GPUs but {visible_gpus} "
            "GPU(s) are visible; run on a node with 2+ GPUs or set infrastructure.distributed=ddp"
        )
    return plan


def _world(cfg: MedtuneConfig, visible_gpus: int) -> WorldPlan:
    infra = cfg.infrastructure
    nnodes = infra.nodes
    if cfg.training.device == "cpu" or visible_gpus == 0:
        if infra.num_gpus != "auto" and cfg.training.device != "cpu":
            raise EnvironmentProblem(
                f"infrastructure.num_gpus is {infra.num_gpus} but no CUDA GPU is visible; "
                "run on a GPU node or set infrastructure.num_gpus=auto"
            )
        return WorldPlan(infra.cpu_processes, nnodes, "gloo")
    if infra.num_gpus == "auto":
        return WorldPlan(visible_gpus, nnodes, "nccl")
    if infra.num_gpus > visible_gpus:
        raise EnvironmentProblem(
            f"infrastructure.num_gpus is {infra.num_gpus} but only {visible_gpus} GPU(s) are visible; "
            f"set infrastructure.num_gpus={visible_gpus} or auto"
        )
    return WorldPlan(infra.num_gpus, nnodes, "nccl")


def training_command(cfg: MedtuneConfig, run: RunDir, plan: WorldPlan, wrap: list[str] | None = None) -> list[str]:
    """The finetune stage as a command: torchrun for several processes, else one worker; `wrap` (the
    container prefix) goes right before Python, which inside an image is the image's own `python3`."""
    python = "python3" if wrap else sys.executable
    if not plan.distributed:
        return [*(wrap or []), python, "-m", WORKER_MODULE, str(run.root)]
    return torchrun_command(cfg, run, plan, python, wrap)


def torchrun_command(cfg: MedtuneConfig, run: RunDir, plan: WorldPlan, python: str = sys.executable,
                     wrap: list[str] | None = None) -> list[str]:
    """The full command line: scheduler fan-out (multi-node), container, torchrun, then the worker."""
    torchrun = [*(wrap or []), python, "-m", "torch.distributed.run", f"--nnodes={plan.nnodes}",
                f"--nproc-per-node={plan.nproc_per_node}", "--rdzv-backend=c10d", f"--rdzv-id={run.run_id}"]
    if plan.nnodes == 1:
        # --local-addr: the ranks' MASTER_ADDR (the agent's store) is loopback too, not this host's name.
        torchrun += [f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1"]
    else:
        endpoint = cfg.infrastructure.rdzv_endpoint
        if not endpoint:
            raise EnvironmentProblem(
                "a multi-node run needs infrastructure.rdzv_endpoint (host:port of the first node); "
                "start it with `medtune submit`, whose batch script sets it"
            )
        torchrun += [f"--rdzv-endpoint={endpoint}"]
    command = torchrun + ["--module", WORKER_MODULE, str(run.root)]
    if plan.nnodes > 1 and cfg.infrastructure.cluster == "slurm":
        # One torchrun agent per node; srun propagates the job's environment to every node.
        command = ["srun", f"--nodes={plan.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *command]
    elif plan.nnodes > 1 and cfg.infrastructure.cluster == "pbs":
        command = ["pbsdsh", "-u", "--", *command]
    return command


def narrowed_devices(plan: WorldPlan, visible_gpus: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a run that uses fewer GPUs than it sees, else nothing. Needed because
    a lone process that sees several GPUs is run by the Trainer as torch DataParallel, which also
    multiplies the logged loss by the GPU count (measured: 12.80 instead of 6.40 on 2 H200s)."""
    if plan.backend != "nccl" or plan.nproc_per_node >= visible_gpus:
        return {}
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [d.strip() for d in listed.split(",") if d.strip()] or [str(i) for i in range(visible_gpus)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids[: plan.nproc_per_node])}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_in_subprocess(cfg: MedtuneConfig, run: RunDir, plan: WorldPlan, command: list[str],
                        devices: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the rank(s), wait for them, and return the training metrics rank 0 wrote to the manifest;
    `devices` (from `narrowed_devices`) limits the GPUs they see."""
    env = {**os.environ, **devices} if devices else None
    if plan.backend == "gloo" and plan.nnodes == 1:
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # one node: keep gloo's sockets on loopback
    log.info("finetune: %d process(es) on %d node(s) (%s)%s: %s", plan.world_size, plan.nnodes, plan.backend,
             f", GPUs {devices['CUDA_VISIBLE_DEVICES']}" if devices else "", " ".join(command))
    started = time.time()
    proc = subprocess.Popen(command, env=env)
    signalled: list[str] = []

    def forward(signum: int, frame: Any) -> None:
        signalled.append(signal.Signals(signum).name)
        for worker in _workers(proc.pid):
            worker.send_signal(signal.SIGUSR1)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    manifest = run.manifest()
    stop = manifest.get("preemption", {})
    if stop.get("time", 0) >= started:
        raise Preempted(f"training stopped by {signalled[0] if signalled else stop.get('signal')} after saving a checkpoint at step "
                        f"{stop.get('step')}; rerun with `medtune run --resume {run.root}` to continue")
    failed = manifest.get("worker_error", {})
    if code != 0 and failed.get("time", 0) >= started:
        raise MedtuneError(failed["message"])
    if code != 0:
        why = f" after {signalled[0]}" if signalled else ""
        raise RuntimeError(f"training exited with code {code}{why}; see {run.log_file}")
    return manifest.get("training", {})


def _workers(pid: int) -> list[psutil.Process]:
    """The rank processes below the torchrun agent (signalling the agent itself would kill it)."""
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in found:
        try:
            if WORKER_MODULE in " ".join(child.cmdline()) and "torch.distributed.run" not in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:
            continue
    return workers
