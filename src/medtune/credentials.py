"""Credentials: where the Hugging Face token and the cloud keys come from, and what must never show them.

medtune reads no secret from a config file or the command line. The Hub token comes from `HF_TOKEN`
/ `HUGGING_FACE_HUB_TOKEN` or `model.hf_token_file` (else huggingface_hub's own token file); bucket
credentials are read by the storage libraries themselves (botocore, google-auth, adlfs) from their
usual variables and files. Child processes (torchrun ranks, the container, a batch job) inherit
them through the environment, never through arguments or files medtune writes.

This module names those variables and files (`SECRET_ENV_VARS`, `credential_files`), collects their
values for log redaction, warns when other users can open a credential file, and refuses a
credential written into a configured URL.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import stat
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from medtune.errors import ConfigError

if TYPE_CHECKING:
    from medtune.config import MedtuneConfig

log = logging.getLogger("medtune.credentials")

# Variables whose whole value is a secret (the access key id is not, strictly, but it names the
# account: it is treated as one).
SECRET_ENV_VARS = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_SECRET",
)
# Secret fields inside those files: a Google service-account / authorized-user JSON, an AWS INI file.
GOOGLE_SECRET_FIELDS = ("private_key", "private_key_id", "client_secret", "refresh_token")
AWS_SECRET_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
# Parts of an Azure connection string that are secrets on their own.
AZURE_SECRET_PARTS = ("AccountKey", "SharedAccessSignature")
# Config keys holding URLs, and the URL query parameters that are credentials (S3 presigned, Azure SAS).
URL_KEYS = ("infrastructure.output_bucket", "dataset.dataset_bucket", "infrastructure.container.bucket",
            "infrastructure.container.lfs_repo")
SECRET_QUERY_PARAMS = ("sig", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "token", "access_token")
# Shorter values are not redacted: replacing every "test" in a log would garble it and protect nothing.
MIN_SECRET_CHARS = 8


def credential_files(hf_token_file: str = "", env: Mapping[str, str] | None = None) -> list[Path]:
    """The credential files this run may read, those that exist."""
    from huggingface_hub import constants

    env = os.environ if env is None else env
    candidates = [Path(hf_token_file).expanduser()] if hf_token_file else []
    candidates.append(Path(env.get("HF_TOKEN_PATH") or constants.HF_TOKEN_PATH).expanduser())
    candidates.append(Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials").expanduser())
    if env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        candidates.append(Path(env["GOOGLE_APPLICATION_CREDENTIALS"]).expanduser())
    seen: dict[Path, None] = {}
    for path in candidates:
        if path.is_file():
            seen.setdefault(path, None)
    return list(seen)


def secret_values(hf_token: str = "", hf_token_file: str = "", env: Mapping[str, str] | None = None) -> list[str]:
    """Every credential value in reach of this process: what the log filter replaces with `***`."""
    env = os.environ if env is None else env
    values = [hf_token, *(env.get(var, "") for var in SECRET_ENV_VARS)]
    values.append(env.get("AZURE_STORAGE_SAS_TOKEN", "").lstrip("?"))
    for part in env.get("AZURE_STORAGE_CONNECTION_STRING", "").split(";"):
        key, _, value = part.partition("=")
        if key.strip() in AZURE_SECRET_PARTS:
            values.append(value)
    for path in credential_files(hf_token_file, env):
        values += _file_secrets(path)
    found = {v.strip() for v in values if len(v.strip()) >= MIN_SECRET_CHARS}
    return sorted(found, key=len, reverse=True)  # longest first: a secret containing another goes whole


def run_secrets(cfg: MedtuneConfig) -> list[str]:
    """`secret_values` for a resolved config (its token may have come from `model.hf_token_file`)."""
    token = cfg.model.hf_token.get_secret_value() if cfg.model.hf_token else ""
    return secret_values(token, cfg.model.hf_token_file)


def _file_secrets(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return []
        values = [str(data[k]) for k in GOOGLE_SECRET_FIELDS if isinstance(data, dict) and data.get(k)]
        # A PEM key quoted in a repr or in JSON shows its newlines as `\n`: its body lines are redacted one by one.
        return values + [line for v in values for line in v.splitlines() if not line.startswith("-----")]
    if text.lstrip().startswith("["):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text)
        except configparser.Error:
            return []
        return [parser[s][k] for s in parser.sections() for k in AWS_SECRET_FIELDS if parser[s].get(k)]
    return [text.strip()]  # a token file holds only the token


def loose_permission_warnings(hf_token_file: str = "", env: Mapping[str, str] | None = None) -> list[str]:
    """One line per credential file that users other than its owner can read or write."""
    lines = []
    for path in credential_files(hf_token_file, env):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            lines.append(f"credential file {path} has mode {mode:04o}: other users on this machine can open it; "
                         f"run `chmod 600 {path}`")
    return lines


def warn_loose_permissions(hf_token_file: str = "", env: Mapping[str, str] | None = None) -> None:
    for line in loose_permission_warnings(hf_token_file, env):
        log.warning(line)


def refuse_url_credentials(cfg: MedtuneConfig) -> None:
    """A password or signature inside a configured URL would be written to config.yaml, training.env,
    the manifest and argv like any key: it must come from the environment instead."""
    for key in URL_KEYS:
        value: object = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if url_holds_credential(str(value)):
            raise ConfigError(f"config key `{key}` holds a credential inside its URL; remove it and provide it "
                              "through the environment (AWS_*, AZURE_STORAGE_*, GOOGLE_APPLICATION_CREDENTIALS, "
                              "a git credential helper)")


def url_holds_credential(url: str) -> bool:
    """A password (`scheme://user:password@host`) or a signature/token query parameter."""
    parts = urllib.parse.urlsplit(url)
    params = {name.lower() for name, _ in urllib.parse.parse_qsl(parts.query)}
    return bool(parts.password or params & set(SECRET_QUERY_PARAMS))
