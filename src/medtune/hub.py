"""Publishing to the Hugging Face Hub (`output.push_to_hub`): one commit with the model card.

Repo layout, so the usual one-liners work on the repo id:
- adapter only: the adapter at the root (`PeftModel.from_pretrained(base, "org/name")`);
- with `output.hub_push_merged`: the merged weights at the root (`vllm serve org/name`) and the
  adapter in `adapters/` (`PeftModel.from_pretrained(base, "org/name", subfolder="adapters")`).
The repo is created private unless `output.hub_private` is false. The token comes from `HF_TOKEN`
or `model.hf_token_file` and is only ever sent as an HTTP header.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medtune.config import MedtuneConfig, OutputConfig
from medtune.errors import MedtuneError
from medtune.rundir import RunDir

log = logging.getLogger("medtune.hub")


class HubError(MedtuneError):
    """Publishing to the Hub is impossible as configured, or the Hub refused it."""


def check_publishing(cfg: MedtuneConfig) -> None:
    """Before any download: a push that can only fail at the very end is refused now."""
    if not cfg.output.push_to_hub:
        return
    if cfg.model.hf_token is None:
        raise HubError("output.push_to_hub needs a Hub token with write access: export HF_TOKEN or set model.hf_token_file")
    if cfg.output.hub_push_merged and not cfg.output.merge_full_weights:
        raise HubError("output.hub_push_merged needs merged weights: set output.merge_full_weights=true")


def push_to_hub(cfg: OutputConfig, run: RunDir, token: str | None) -> dict[str, Any]:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not token:
        raise HubError("publishing to the Hub needs a token with write access: export HF_TOKEN or set model.hf_token_file")
    layout = _layout(cfg, run)
    operations = [CommitOperationAdd(path_in_repo=f"{prefix}{p.relative_to(folder).as_posix()}", path_or_fileobj=str(p))
                  for prefix, folder in layout for p in sorted(folder.rglob("*")) if p.is_file()]
    api = HfApi(token=token)
    log.info("hub: publishing %d files to %s (%s)", len(operations), cfg.hub_model_id,
             "private" if cfg.hub_private else "public")
    try:
        repo = api.create_repo(cfg.hub_model_id, private=cfg.hub_private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo_id=cfg.hub_model_id, operations=operations, repo_type="model",
                                   commit_message=f"medtune run {run.run_id}")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no response"
        raise HubError(f"the Hub refused the push to {cfg.hub_model_id} (HTTP {status}); check that the token "
                       "can write to that namespace, or fix output.hub_model_id") from None
    log.info("hub: published %s at commit %s", repo, commit.oid)
    return {"repo": str(repo), "commit": commit.oid, "private": cfg.hub_private, "files": len(operations),
            "merged": cfg.hub_push_merged}


def _layout(cfg: OutputConfig, run: RunDir) -> list[tuple[str, Path]]:
    if not (run.adapters / "adapter_config.json").is_file():
        raise HubError(f"{run.adapters} has no adapter to publish; finish the run first")
    if not cfg.hub_push_merged:
        return [("", run.adapters)]
    if not (run.merged / "config.json").is_file():
        raise HubError(f"{run.merged} has no merged weights to publish; set output.merge_full_weights=true and rerun")
    return [("", run.merged), ("adapters/", run.adapters)]


def push_run(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """`medtune push RUN_DIR`: publish a finished run with the config it ran with (plus `--set`)."""
    from medtune.config_io import load_config

    run = RunDir(Path(run_dir).expanduser().resolve())
    if not run.config_yaml.is_file():
        raise HubError(f"{run.root} is not a medtune run directory (no config.yaml); pass medical-finetune-<RUN_ID>")
    cfg = load_config(run.config_yaml, overrides=overrides)
    if not cfg.output.hub_model_id:
        raise HubError("no Hub repo to publish to: add --set output.hub_model_id=org/name")
    token = cfg.model.hf_token.get_secret_value() if cfg.model.hf_token else None
    result = push_to_hub(cfg.output, run, token)
    run.finish_stage("hub", 0.0, **result)
    return result
