"""report.html from partial manifests, and run_progress() from a run directory's files."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

from medtune.progress import ProgressLog, run_progress
from medtune.report import render_report, write_report
from medtune.rundir import RunDir


def _run(tmp_path, manifest):
    run = RunDir(tmp_path / "medical-finetune-r1")
    run.logs.mkdir(parents=True)
    run.manifest_path.write_text(json.dumps(manifest))
    return run


def test_report_of_a_failed_run_without_training(tmp_path):
    run = _run(tmp_path, {"status": "failed", "error": "data: <bad> row", "stages": {"setup": {"status": "done",
                                                                                              "seconds": 1.5}}})
    text = write_report(run).read_text()
    assert "&lt;bad&gt;" in text and "<bad>" not in text  # escaped
    assert "Stage timings" in text and "Training" not in text and "Safety probes" not in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # self-contained: nothing fetched


def test_report_shows_whatever_the_data_stage_wrote(tmp_path):
    report = {"train_examples": 10, "length_p50": 12, "duplicates": {"exact": 3, "near": 1},
              "phi_scan": {"rows_flagged": 2, "patterns": {"email": 2}}, "new_key_from_the_future": "x"}
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.8}]
    manifest = {"status": "succeeded", "stages": {"data": {"status": "done", "seconds": 1, "report": report}},
                "training": {"history": history, "base_eval_loss": 2.2, "throughput": [
                    {"step": 1, "seconds": 1.0, "tokens_per_second": 100.0, "peak_memory_gib": 1.2}]}}
    text = render_report(_run(tmp_path, manifest), manifest)
    for needle in ("phi scan", "rows_flagged", "duplicates", "new_key_from_the_future"):
        assert needle in text
    assert text.count('src="data:image/png;base64,') == 2  # loss curve + throughput/memory


def test_progress_log_and_run_progress(tmp_path):
    run = _run(tmp_path, {"status": "running", "stages": {s: {"status": "done"} for s in
                                                         ("setup", "container", "model", "data")}})
    assert run_progress(run.root)["stage"] == "finetune" and run_progress(run.root)["step"] is None
    callback = ProgressLog(run.logs, "cpu", tty=False)
    state = SimpleNamespace(global_step=0, max_steps=8, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen = 4, 400
    callback.on_log(None, state, None, logs={"loss": 1.25, "learning_rate": 1e-3})
    callback.on_log(None, state, None, logs={"eval_loss": 1.5})
    got = run_progress(run.root)
    assert (got["stage"], got["step"], got["total_steps"], got["loss"], got["eval_loss"]) == ("finetune", 4, 8, 1.25, 1.5)
    assert callback.samples[0]["step"] == 4 and callback.samples[0]["peak_memory_gib"] > 0
    run.manifest_path.write_text(json.dumps({"status": "succeeded", "stages": {}}))
    assert run_progress(run.root)["stage"] is None
    assert run_progress(tmp_path / "nothing")["status"] == "not started"


def test_progress_bar_on_a_terminal(tmp_path):
    callback = ProgressLog(tmp_path, "cpu", tty=True)
    state = SimpleNamespace(global_step=0, max_steps=4, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    assert callback.bar is not None and callback.bar.tasks[0].total == 4
    state.global_step, state.num_input_tokens_seen = 2, 100
    callback.on_log(None, state, None, logs={"loss": 0.5})
    callback.on_step_end(None, state, None)
    assert callback.bar.tasks[0].completed == 2 and "loss 0.5000" in callback.bar.tasks[0].fields["info"]
    callback.on_train_end(None, state, None)
    assert callback.bar is None and json.loads((tmp_path / "progress.json").read_text())["status"] == "done"
