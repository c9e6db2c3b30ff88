"""The `medtune` command: parse arguments, load the config, call the workflow, map errors to exit codes.

A user mistake (`MedtuneError`) prints one line and exits 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medtune.presets import PRESET_DESCRIPTIONS
from medtune.config_io import default_preset, load_config, render_markdown, render_yaml, to_dict
from medtune.errors import ConfigError, MedtuneError
from medtune.runlog import quiet_import_notices

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Fine-tune open LLMs on medical instruction data (LoRA/QLoRA) and deliver servable weights.\n\n"
                  "Exit codes: 0 done, 1 failed (or an unexpected error: one line, rerun with --debug), "
                  "2 a mistake in the config or inputs (one line naming the fix), 75 preempted.")
out = Console(soft_wrap=True)
EXIT_UNEXPECTED = 1  # like a failed run: `run` already uses 1 for "failed", 2 stays "your input"

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
PresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="Start from this preset (`medtune presets`).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: section.key=value (repeatable).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]


@app.callback()
def _global_options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of any error (also accepted after the command).")] = False) -> None:
    """`medtune --debug COMMAND ...`: main() reads the flag from argv itself, before any command runs."""


def _resolve(config: Path | None, preset: str | None, overrides: list[str] | None):
    fallback = None
    if config is None and preset is None:
        import torch

        fallback = default_preset(torch.cuda.is_available())
    return load_config(config, preset, overrides or [], fallback_preset=fallback or "")


@app.command()
def run(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, debug: DebugOpt = False,
        run_id: Annotated[str | None, typer.Option("--run-id", help="Resume (or name) this run id.")] = None,
        resume: Annotated[str | None, typer.Option(
            "--resume", help="Continue this run (id or run directory) with its own config.yaml.")] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug-level medtune logs.")] = False) -> int:
    """Run the whole workflow: setup, container, model, data, finetune, merge, upload, cleanup.

    Exit codes: 0 succeeded, 1 failed, 2 user error, 75 stopped by SIGTERM/SIGUSR1 after saving a
    checkpoint (rerun with --resume to continue).
    """
    if resume:
        if config or preset or run_id:
            raise ConfigError("--resume reloads the run's own config.yaml; drop --config/--preset/--run-id "
                              "(change a key with --set)")
        from medtune.resume import resume_config

        cfg = resume_config(resume, list(set_ or []))
    else:
        overrides = list(set_ or []) + ([f"output.run_id={run_id}"] if run_id else [])
        cfg = _resolve(config, preset, overrides)
    from medtune.workflow import run_workflow

    result = run_workflow(cfg, verbose=verbose)
    manifest = result.manifest()
    out.print(f"\nRun {result.run_id} {manifest.get('status')}. Outputs in {result.root}:")
    for name in ("adapters", "merged", "summary.md", "logs/finetune.log"):
        if (result.root / name).exists():
            out.print(f"  {result.root / name}")
    return 0 if manifest.get("status") == "succeeded" else 1


@app.command()
def init(preset: PresetOpt = None,
         output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
         debug: DebugOpt = False) -> int:
    """Write a complete, commented YAML config."""
    cfg = _resolve(None, preset, [])
    text = render_yaml(cfg, header=f"medtune config (preset {cfg.model.model_config_name}).\n"
                                   "Every key is shown with its default; delete what you don't change.")
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        out.print(f"wrote {output}")
    return 0


@app.command()
def presets() -> int:
    """List the shipped presets."""
    table = Table("preset", "what it is")
    for name, desc in PRESET_DESCRIPTIONS.items():
        table.add_row(name, desc)
    out.print(table)
    return 0


@app.command("config")
def show_config(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, debug: DebugOpt = False,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False) -> int:
    """Print the resolved config (secrets shown as ***)."""
    cfg = _resolve(config, preset, set_)
    sys.stdout.write(json.dumps(to_dict(cfg), indent=2) + "\n" if as_json else render_yaml(cfg))
    return 0


class SchedulerName(str, Enum):
    slurm = "slurm"
    pbs = "pbs"


@app.command()
def submit(scheduler: Annotated[SchedulerName, typer.Option("--scheduler", help="Batch system to submit to.")],
           config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, debug: DebugOpt = False,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the batch script; submit nothing.")] = False) -> int:
    """Submit the workflow as a Slurm or PBS batch job (settings: infrastructure.slurm / infrastructure.pbs)."""
    cfg = _resolve(config, preset, set_)
    from medtune.launch.submit import submit as submit_job
    from medtune.workflow import preflight

    if dry_run:
        sys.stdout.write(submit_job(cfg, scheduler.value, dry_run=True).script)
        return 0
    preflight(cfg, on_this_machine=False)
    job = submit_job(cfg, scheduler.value)
    out.print(f"submitted {scheduler.value} job {job.job_id}: run {job.run.run_id} in {job.run.root}")
    out.print(f"follow it with `medtune status {job.run.root}`")
    return 0


@app.command()
def status(run: Annotated[str, typer.Argument(help="Run id (under output.output_root) or run directory.")],
           set_: SetOpt = None, debug: DebugOpt = False,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> int:
    """Show a run's stage, step/total, last loss and its scheduler job state."""
    from medtune.resume import find_run, output_root_override
    from medtune.status import run_status

    info = run_status(find_run(run, output_root_override(list(set_ or []))))
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    table = Table("", "", show_header=False)
    for key, value in info.items():
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)
    return 0


@app.command()
def doctor(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> int:
    """Check this machine against the config: GPUs, CUDA, bitsandbytes, disk, containers, schedulers, token."""
    from medtune.doctor import inspect_machine, judge, machine_rows

    cfg = _resolve(config, preset, set_)
    found = inspect_machine(cfg)
    table = Table("check", "found")
    for name, value in machine_rows(found):
        table.add_row(name, value)
    out.print(table)
    findings = judge(cfg, found)
    for f in findings:
        out.print(f"{f.verdict.upper():4} {f.requirement}: {f.detail}", markup=False)
    return 1 if any(f.verdict == "fail" for f in findings) else 0


@app.command()
def schema() -> int:
    """Print the configuration reference (docs/config.md) generated from the schema."""
    sys.stdout.write(render_markdown())
    return 0


data_app = typer.Typer(help="Look at the training data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, debug: DebugOpt = False,
                 example: Annotated[int, typer.Option("--example", help="Which training example to show.")] = 0) -> int:
    """Check and tokenize the data as `run` would; print the data report and one example, trained tokens highlighted."""
    cfg = _resolve(config, preset, set_)
    from medtune.data_inspect import inspect_data

    inspect_data(cfg, out, example=example)
@app.command()
def plan(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, debug: DebugOpt = False,
         gpu: Annotated[str | None, typer.Option("--gpu", help="Plan for this card (e.g. H100-80GB, A100-40GB) or cpu.")] = None,
         rows: Annotated[int | None, typer.Option("--rows", help="Training rows, when the dataset is not local.")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> int:
    """Estimate parameters, memory, tokens, time and the scheduler request, offline, before any download."""
    from medtune.plan import make_plan, render_plan

    result = make_plan(_resolve(config, preset, set_), gpu, rows)
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if as_json else render_plan(result))
    return 0


RunDirArg = Annotated[Path, typer.Argument(help="A run directory (outputs/medical-finetune-<RUN_ID>).")]


@app.command("eval")
def eval_run(run_dir: RunDirArg, debug: DebugOpt = False,
             questions: Annotated[Path | None, typer.Option("--questions", help="JSONL of questions to answer.")] = None,
             mcq: Annotated[Path | None, typer.Option("--mcq", help="MedQA/MedMCQA-style JSONL to score.")] = None) -> int:
    """Base vs tuned: answers (greedy + seeded), multiple-choice accuracy, safety probes; updates report.html."""
    from medtune.credentials import secret_values
    from medtune.medeval import evaluate_run_dir
    from medtune.runlog import setup_logging

    setup_logging(None, secret_values())
    result = evaluate_run_dir(run_dir, questions, mcq)
    for i, a in enumerate(result["answers"], 1):
        out.print(f"\n[bold]Q{i}[/bold] {escape(a['question'])}")
        for side in ("base", "tuned"):
            ans = a["greedy"][side]
            out.print(f"  [bold]{side}[/bold] ({ans['tokens']} tokens{'' if ans['stopped'] else ', DID NOT STOP'}): "
                      f"{escape(ans['text'])}", highlight=False)
    out.print(f"\nreport: {run_dir.resolve() / 'report.html'}")
    return 0


@app.command()
def upload(run_dir: Annotated[Path, typer.Argument(help="A run directory (medical-finetune-<RUN_ID>).")],
           to: Annotated[str, typer.Option("--to", help="fsspec URL, e.g. s3://bucket/prefix.")],
           debug: DebugOpt = False) -> int:
    """Upload a finished run to a bucket: only missing or changed files, each verified by sha256."""
    from medtune.storage import upload_run

    result = upload_run(run_dir, to)
    out.print(f"uploaded to {result['destination']}: {result['copied']} copied, "
              f"{result['already_present']} already there (verified)")
    return 0


@app.command()
def push(run_dir: Annotated[Path, typer.Argument(help="A run directory (medical-finetune-<RUN_ID>).")],
         set_: SetOpt = None, debug: DebugOpt = False) -> int:
    """Publish a finished run to the Hub with its run's config (`--set output.hub_model_id=org/name`)."""
    from medtune.hub import push_run

    result = push_run(run_dir, list(set_ or []))
    out.print(f"published {result['repo']} at commit {result['commit']}")
    return 0


@app.command()
def report(run_dir: RunDirArg, debug: DebugOpt = False) -> int:
    """Write RUN_DIR/report.html (self-contained) from the run's manifest.json."""
    from medtune.errors import RunDirError
    from medtune.report import write_report
    from medtune.rundir import RunDir

    run = RunDir(run_dir.expanduser().resolve())
    if not run.manifest_path.is_file():
        raise RunDirError(f"{run.root} has no manifest.json; give a run directory that `medtune run` created")
    out.print(f"wrote {write_report(run)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    quiet_import_notices()
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="medtune", standalone_mode=False)
    except MedtuneError as exc:
        if debug:
            sys.stderr.write(_redacted(traceback.format_exc()))
        print(f"error: {_redacted(exc)}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.ClickException, typer.TyperException) as exc:  # typer vendors its own click
        exc.show()
        return 2
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:  # not the user's mistake: still one line, the traceback behind --debug
        if debug:
            sys.stderr.write(_redacted(traceback.format_exc()))
        print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)}; this is a bug in medtune or a library "
              "it uses, not your input: " + ("report it with the traceback above" if debug else
                                             "rerun with --debug for the traceback and report it"), file=sys.stderr)
        return EXIT_UNEXPECTED
    return result if isinstance(result, int) else 0


def _redacted(exc: BaseException | str) -> str:
    from medtune.credentials import secret_values
    from medtune.runlog import redact

    return redact(str(exc), secret_values())


def _first_line(exc: BaseException) -> str:
    lines = _redacted(exc).strip().splitlines()
    return lines[0][:300] if lines else "(no message)"


def run_cli() -> None:
    try:
        code = main()
    except Exception:  # a bug: the traceback, minus any credential it quotes (batch logs keep stderr)
        sys.stderr.write(_redacted(traceback.format_exc()))
        code = 1
    sys.exit(code)
