"""The pipeline: setup → container → model → data → finetune → merge → upload → cleanup.

Each stage is one call from typed config to files in the run directory; a stage whose output is
already complete is skipped, so rerunning the same command after a crash finishes the run.
Cleanup (validation, model cards, summary.md) always runs, also after a failure; a succeeded run is
then published (Hub push, bucket upload), last, so what leaves the machine is the final state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.config import MedtuneConfig
from medtune.config_io import render_env, render_yaml, to_dict
from medtune.credentials import run_secrets, warn_loose_permissions
from medtune.diskspace import disk_full_as_error
from medtune.errors import MedtuneError
from medtune.preemption import Preempted
from medtune.modelcard import write_card
from medtune.provenance import medtune_revision, model_fingerprint
from medtune.rundir import RunDir, new_run_id, remove_stale_temps, write_text
from medtune.runlog import redact, setup_logging
from medtune.runlock import run_lock

log = logging.getLogger("medtune")


def preflight(cfg: MedtuneConfig, on_this_machine: bool = True) -> None:
    """Input checks that need no download or GPU; a failure here leaves nothing on disk.
    `medtune submit` skips the hardware check: a login node need not have the job's GPUs."""
    from medtune.data.load import check_source as check_data
    from medtune.hub import check_publishing
    from medtune.launch.torchrun import plan_world
    from medtune.model import check_source as check_model
    from medtune.preflight import check_disk, check_model_files, check_paths
    from medtune.setup import check_environment, environment_report

    check_paths(cfg)
    if on_this_machine:
        report = environment_report([])
        check_environment(cfg, report)
        plan_world(cfg, len(report["gpus"]))  # more GPUs asked for than visible: refused here, not in setup
    check_model(cfg.model)
    check_model_files(cfg.model)
    check_disk(cfg)
    check_data(cfg.dataset)
    check_publishing(cfg)


def run_workflow(cfg: MedtuneConfig, verbose: bool = False) -> RunDir:
    preflight(cfg)
    run = RunDir.for_run(cfg.output.output_root, cfg.output.run_id or new_run_id()).create()
    # A second `medtune run` on this directory is refused before it writes anything; a disk that fills up
    # outside a stage (the manifest, the summary) is one line too.
    with run_lock(run.root) as stale, disk_full_as_error("medtune run", run.root):
        return _run_locked(cfg, run, verbose, stale)


def _run_locked(cfg: MedtuneConfig, run: RunDir, verbose: bool, stale_lock: list[str]) -> RunDir:
    # config.yaml carries the run id, so `--resume`, the torchrun ranks and a requeued job find this run.
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"run_id": run.run_id})})
    secrets = run_secrets(cfg)
    setup_logging(run.log_file, secrets, verbose)
    warn_loose_permissions(cfg.model.hf_token_file)
    for note in stale_lock:
        log.warning(note)
    remove_stale_temps(run.root)
    log.info("medtune %s: run %s in %s", __version__, run.run_id, run.root)
    write_text(run.training_env, render_env(cfg))
    write_text(run.config_yaml, render_yaml(cfg, header=f"Resolved config of run {run.run_id} (secrets removed)."))
    run.update_manifest(medtune_version=__version__, run_id=run.run_id, config=to_dict(cfg), status="running",
                        seed=cfg.training.seed, provenance={"medtune_git": medtune_revision()})
    error, status = None, None
    try:
        _run_stages(cfg, run)
    except Preempted as exc:
        error, status = str(exc), "preempted"
        raise
    except MedtuneError as exc:
        error = str(exc)
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # The error text lands in manifest.json and summary.md: no credential it may quote goes with it.
        _cleanup(cfg, run, redact(error, secrets) if error else None, status)
    _publish(cfg, run)
    return run


def _run_stages(cfg: MedtuneConfig, run: RunDir) -> None:
    from medtune.container import container
    from medtune.data import prepare_data
    from medtune.launch.apptainer import exec_prefix
    from medtune.launch.torchrun import narrowed_devices, plan_world, train_in_subprocess, training_command
    from medtune.merge import merge
    from medtune.setup import setup
    from medtune.train import train

    environment = _stage(run, "setup", lambda: setup(cfg, run), always=True, record=False)
    run.update_manifest(environment=environment)
    plan = plan_world(cfg, len(environment["gpus"]))
    image = _stage(run, "container", lambda: container(cfg.infrastructure.container), always=True)
    model = _stage(run, "model", lambda: _model_with_fingerprint(cfg, run), always=True)
    model_path = model["path"]
    _stage(run, "data", lambda: prepare_data(cfg, run, model_path), done=run.data.is_dir())
    done = (run.adapters / "adapter_config.json").is_file()
    devices = narrowed_devices(plan, len(environment["gpus"]))
    if plan.distributed or image.get("image") or devices:
        command = training_command(cfg, run, plan, exec_prefix(image, [run.root, Path(model_path)]))
        finetune = lambda: train_in_subprocess(cfg, run, plan, command, devices)  # noqa: E731
    else:
        finetune = lambda: train(cfg, run, model_path, str(run.data))  # noqa: E731
    metrics = _stage(run, "finetune", finetune, done=done, record=False)
    if metrics:
        run.update_manifest(training=metrics)
    if cfg.output.merge_full_weights:
        _stage(run, "merge", lambda: merge(cfg.output, run, model_path), done=(run.merged / "config.json").is_file())


def _model_with_fingerprint(cfg: MedtuneConfig, run: RunDir) -> dict[str, Any]:
    """The base model, and its files' digests in the manifest (timed with the stage that reads them)."""
    from medtune.model import prepare_model

    model = prepare_model(cfg.model)
    if "base_model_files" not in run.manifest().get("provenance", {}):
        cache = Path(cfg.model.model_cache_dir).expanduser()
        run.update_manifest(provenance={"base_model_files": model_fingerprint(model["path"], cache)})
    return model


def _stage(run: RunDir, name: str, fn: Callable[[], Any], done: bool = True, always: bool = False,
           record: bool = True) -> Any:
    """Run one stage unless the manifest says it finished and its output is still there. The stage's
    dict result is recorded under `stages.<name>` unless `record` is false (the caller files it elsewhere)."""
    previous = run.stage(name)
    if not always and previous.get("status") == "done" and done:
        log.info("== %s: already complete, skipped", name)
        return None
    log.info("== %s", name)
    start = time.perf_counter()
    with disk_full_as_error(f"stage {name}", run.root):
        result = fn()
    info = result if record and isinstance(result, dict) else {}
    run.finish_stage(name, time.perf_counter() - start, **info)
    return result


def _cleanup(cfg: MedtuneConfig, run: RunDir, error: str | None, status: str | None = None) -> None:
    from medtune.cleanup import cleanup
    from medtune.evaluate import validate

    log.info("== cleanup")
    if error is None and (run.merged / "config.json").is_file():
        try:
            model_path = run.stage("model")["path"]
            result = _stage(run, "validate", lambda: validate(cfg.evaluation, run, model_path))
            if result:
                run.update_manifest(validation=result)
                if not result["merge_check"]["passed"]:
                    error = "merged weights disagree with adapter-on-base (see summary.md); report this as a bug"
        except Exception as exc:  # a failed check must still leave a summary behind
            log.exception("validate failed")
            error = f"validation failed: {type(exc).__name__}: {exc}"
    if error is None and (run.adapters / "adapter_config.json").is_file():
        error = _evaluate(cfg, run)
    model_path = run.stage("model").get("path")
    if model_path:  # the cards again, now that evaluation results and all timings are known
        for kind, folder in (("adapters", run.adapters), ("merged", run.merged)):
            if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
                write_card(folder, kind, run.manifest(), run.tokenizer_source(model_path))
    status = cleanup(run, error, status)
    _report(run)
    log.info("run %s %s; summary: %s", run.run_id, status, run.summary)


def _evaluate(cfg: MedtuneConfig, run: RunDir) -> str | None:
    """Base vs tuned answers, multiple choice and safety probes into manifest.json (`evaluation`)."""
    from medtune.medeval import evaluate_run

    try:
        result = _stage(run, "evaluate", lambda: evaluate_run(cfg, run, run.stage("model")["path"]), record=False)
    except Exception as exc:  # like validation: a failed evaluation still leaves a summary and a report
        log.exception("evaluate failed")
        return f"evaluation failed: {type(exc).__name__}: {exc}"
    if result:
        run.update_manifest(evaluation=result)
    return None


def _report(run: RunDir) -> None:
    from medtune.report import write_report

    try:
        log.info("report: %s", write_report(run))
    except Exception:  # the report is a view of manifest.json; never let it mask the run's own status
        log.exception("report.html not written")


def _publish(cfg: MedtuneConfig, run: RunDir) -> None:
    """Upload and Hub push run last, so they carry the final summary, cards and manifest."""
    from medtune.cleanup import cleanup
    from medtune.hub import push_to_hub
    from medtune.storage import upload

    if run.manifest().get("status") != "succeeded":
        return
    try:
        if cfg.output.push_to_hub:  # first, so the uploaded manifest records the Hub commit
            token = cfg.model.hf_token.get_secret_value() if cfg.model.hf_token else None
            _stage(run, "hub", lambda: push_to_hub(cfg.output, run, token), always=True)
        log.info("== upload")
        upload(cfg.infrastructure.output_bucket, run)
    except MedtuneError as exc:
        cleanup(run, redact(str(exc), run_secrets(cfg)))
        raise
