"""The pipeline: setup → container → model → data → finetune → merge → upload → cleanup.

Each stage is one call from typed config to files in the run directory; a stage whose output is
already complete is skipped, so rerunning the same command after a crash finishes the run.
Cleanup (validation + summary.md) always runs, also after a failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from medtune import __version__
from medtune.config import MedtuneConfig
from medtune.config_io import render_env, render_yaml, to_dict
from medtune.errors import MedtuneError
from medtune.rundir import RunDir, new_run_id, remove_stale_temps, write_text
from medtune.runlog import setup_logging

log = logging.getLogger("medtune")


def preflight(cfg: MedtuneConfig) -> None:
    """Input checks that need no download or GPU; a failure here leaves nothing on disk."""
    from medtune.data.load import check_source as check_data
    from medtune.model import check_source as check_model

    check_model(cfg.model)
    check_data(cfg.dataset)


def run_workflow(cfg: MedtuneConfig, verbose: bool = False) -> RunDir:
    preflight(cfg)
    run = RunDir.for_run(cfg.output.output_root, cfg.output.run_id or new_run_id()).create()
    secrets = [cfg.model.hf_token.get_secret_value()] if cfg.model.hf_token else []
    setup_logging(run.log_file, secrets, verbose)
    remove_stale_temps(run.root)
    log.info("medtune %s: run %s in %s", __version__, run.run_id, run.root)
    write_text(run.training_env, render_env(cfg))
    write_text(run.config_yaml, render_yaml(cfg, header=f"Resolved config of run {run.run_id} (secrets removed)."))
    run.update_manifest(medtune_version=__version__, run_id=run.run_id, config=to_dict(cfg), status="running")
    error = None
    try:
        _run_stages(cfg, run)
    except MedtuneError as exc:
        error = str(exc)
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _cleanup(cfg, run, error)
    return run


def _run_stages(cfg: MedtuneConfig, run: RunDir) -> None:
    from medtune.container import container
    from medtune.data import prepare_data
    from medtune.merge import merge
    from medtune.model import prepare_model
    from medtune.setup import setup
    from medtune.storage import upload
    from medtune.train import train

    environment = _stage(run, "setup", lambda: setup(cfg, run), always=True)
    run.update_manifest(environment=environment)
    _stage(run, "container", lambda: container(cfg.infrastructure.container), always=True)
    model = _stage(run, "model", lambda: prepare_model(cfg.model), always=True)
    model_path = model["path"]
    _stage(run, "data", lambda: prepare_data(cfg, run, model_path), done=run.data.is_dir())
    done = (run.adapters / "adapter_config.json").is_file()
    metrics = _stage(run, "finetune", lambda: train(cfg, run, model_path, str(run.data)), done=done)
    if metrics:
        run.update_manifest(training=metrics)
    if cfg.output.merge_full_weights:
        _stage(run, "merge", lambda: merge(cfg.output, run, model_path), done=(run.merged / "config.json").is_file())
    _stage(run, "upload", lambda: upload(cfg.infrastructure.output_bucket, run))


def _stage(run: RunDir, name: str, fn: Callable[[], Any], done: bool = True, always: bool = False) -> Any:
    """Run one stage unless the manifest says it finished and its output is still there."""
    previous = run.stage(name)
    if not always and previous.get("status") == "done" and done:
        log.info("== %s: already complete, skipped", name)
        return None
    log.info("== %s", name)
    start = time.perf_counter()
    result = fn()
    info = result if isinstance(result, dict) and name not in ("setup", "finetune", "evaluate") else {}
    run.finish_stage(name, time.perf_counter() - start, **info)
    return result


def _cleanup(cfg: MedtuneConfig, run: RunDir, error: str | None) -> None:
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
    status = cleanup(run, error)
    _report(run)
    log.info("run %s %s; summary: %s", run.run_id, status, run.summary)


def _evaluate(cfg: MedtuneConfig, run: RunDir) -> str | None:
    """Base vs tuned answers, multiple choice and safety probes into manifest.json (`evaluation`)."""
    from medtune.medeval import evaluate_run

    try:
        result = _stage(run, "evaluate", lambda: evaluate_run(cfg, run, run.stage("model")["path"]))
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
