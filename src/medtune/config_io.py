"""Loading configs (YAML + preset + `--set` + environment) and rendering them (YAML, docs, env file).

Environment variables are read here: `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`); credentials.py reads
the other credential variables, only to redact their values and to check credential files' modes.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from medtune.config import MedtuneConfig
from medtune.presets import DEFAULT_GPU_PRESET, EMBEDDED_PRESET, PRESETS, _deep_merge, embedded_dataset_path, preset_dict
from medtune.credentials import refuse_url_credentials
from medtune.errors import ConfigError

REDACTED = "***"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def default_preset(has_gpu: bool) -> str:
    """With no config and no preset: the seed's Llama 3.1 recipe on a GPU, the embedded model otherwise."""
    return DEFAULT_GPU_PRESET if has_gpu else EMBEDDED_PRESET


def load_config(
    config_file: Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    fallback_preset: str = EMBEDDED_PRESET,
) -> MedtuneConfig:
    """Resolve a config: schema defaults < preset < config file < `--set` overrides; token from env."""
    env = os.environ if env is None else env
    file_data = _read_yaml(config_file) if config_file else {}
    name = preset or file_data.get("model", {}).get("model_config") or (None if config_file else fallback_preset)
    user = file_data
    for item in overrides:
        user = _deep_merge(user, _parse_override(item))
    data = _deep_merge(preset_dict(name) if name in PRESETS or preset else {}, user)
    if name == EMBEDDED_PRESET:
        _own_data_only(data, user)
    if "hf_token" in data.get("model", {}):
        raise ConfigError(
            "model.hf_token must not be written in a config or on the command line; "
            "export HF_TOKEN or set model.hf_token_file instead"
        )
    token = _read_token(data.get("model", {}).get("hf_token_file", ""), env)
    if token:
        data.setdefault("model", {})["hf_token"] = token
    cfg = validate(data)
    refuse_url_credentials(cfg)
    return cfg


def _own_data_only(data: dict[str, Any], user: dict[str, Any]) -> None:
    """The embedded preset's `heldout` split belongs to its bundled data: pointed at other data, the
    preset evaluates on a fraction instead (unless the user named an eval split)."""
    ds, mine = data.get("dataset", {}), user.get("dataset", {})
    if ds.get("local_dataset_path") != str(embedded_dataset_path()) or ds.get("dataset_source") != "local":
        if "eval_split" not in mine:
            ds["eval_split"] = ""


def validate(data: dict[str, Any]) -> MedtuneConfig:
    try:
        return MedtuneConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        raise ConfigError(_explain(errors[0], errors[1:])) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; create one with `medtune init -o {path}`")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML; fix the syntax there") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (model:, dataset:, ...)")
    return data


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r} must look like section.key=value, e.g. --set training.num_epochs=1")
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _read_token(token_file: str, env: Mapping[str, str]) -> str:
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.hf_token_file {token_file} not found; point it at a file holding only the token")
        return path.read_text().strip()
    for var in TOKEN_ENV_VARS:
        if env.get(var):
            return env[var].strip()
    return ""


UNION_BRANCH = re.compile(r"^(constrained-\w+|literal\[.*\]|bool|int|float|str)$")


def _explain(err: Mapping[str, Any], others: Sequence[Mapping[str, Any]] = ()) -> str:
    loc = [str(p) for p in err["loc"] if not UNION_BRANCH.match(str(p))]  # pydantic names a union's branches
    key = ".".join(loc)
    if len(loc) < len(err["loc"]):  # a union, e.g. a number or `auto`: say what the other branches take
        alternatives = [o.get("ctx", {}).get("expected") for o in others if o["type"] == "literal_error"
                        and [str(p) for p in o["loc"] if not UNION_BRANCH.match(str(p))] == loc]
        if alternatives:
            err = {**err, "msg": f"{err['msg']}, or one of {', '.join(a for a in alternatives if a)}"}
    if err["type"] == "extra_forbidden":
        valid = _field_names(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean `{'.'.join(loc[:-1] + close)}`? " if close else ""
        return f"unknown config key `{key}`; {hint}valid keys here: {', '.join(valid)}"
    if err["type"] == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"config key `{key}` = {err['input']!r} is not allowed; use one of {expected}"
    if not loc:
        return f"invalid config: {err['msg'].removeprefix('Value error, ')}"
    field, about = _field_about(loc)
    return (f"config key `{key}` = {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}; "
            f"set {field} to a valid value ({about})")


def _field_about(loc: list[str]) -> tuple[str, str]:
    """The dotted name of the deepest schema field on `loc` and its description's first sentence."""
    model: type[BaseModel] = MedtuneConfig
    names: list[str] = []
    about = "see docs/config.md"
    for part in loc:
        field = _fields(model).get(part)
        if field is None:
            break
        names.append(part)
        about = re.split(r"\. |: ", field.description or about)[0].rstrip(".")
        if not _is_model(field.annotation):
            break
        model = field.annotation
    return ".".join(names) or ".".join(loc), about


def _field_names(loc: list[str]) -> list[str]:
    model: type[BaseModel] = MedtuneConfig
    for part in loc:
        field = _fields(model).get(part)
        if field is None or not _is_model(field.annotation):
            return []
        model = field.annotation
    return list(_fields(model))


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """Fields by the name users write (the alias where one is set)."""
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# --- rendering -----------------------------------------------------------------------------------


def to_dict(cfg: MedtuneConfig, redact: bool = True) -> dict[str, Any]:
    """Plain data for YAML/JSON; secrets become `***` (or are dropped when unset)."""
    data = cfg.model_dump(mode="python", by_alias=True)
    token = cfg.model.hf_token
    data["model"]["hf_token"] = (REDACTED if redact else token.get_secret_value()) if token else None
    return json.loads(json.dumps(data, default=list))


def iter_flat(cfg: MedtuneConfig) -> Iterator[tuple[str, Any]]:
    """(`section.key`, value) pairs, secrets redacted: the body of training.env."""

    def walk(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            yield prefix, value

    yield from walk("", to_dict(cfg))


def render_env(cfg: MedtuneConfig) -> str:
    """KEY=value lines, shell-quoted; secrets show as `***`."""
    lines = []
    for key, value in iter_flat(cfg):
        text = json.dumps(value) if isinstance(value, (list, dict)) else ("" if value is None else str(value))
        lines.append(f"{key.upper().replace('.', '__')}={_shell_quote(text)}")
    return "\n".join(lines) + "\n"


def _shell_quote(text: str) -> str:
    if text and all(c.isalnum() or c in "-_./:~@+," for c in text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def render_yaml(cfg: MedtuneConfig, header: str = "") -> str:
    """A complete, commented YAML file: each key preceded by its description."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    data = to_dict(cfg)
    # The format the loader applies, so a reloaded config.yaml (--resume, torchrun ranks, batch jobs)
    # infers it again rather than enforcing the seed's unset default `json`.
    data["dataset"]["dataset_format"] = cfg.dataset.format_to_use
    _yaml_section(MedtuneConfig, data, 0, lines)
    return "\n".join(lines) + "\n"


def _yaml_section(model: type[BaseModel], data: dict[str, Any], indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for key, field in _fields(model).items():
        if field.exclude:
            continue
        lines.append(f"{pad}# {field.description}")
        if _is_model(field.annotation):
            lines.append(f"{pad}{key}:")
            _yaml_section(field.annotation, data[key], indent + 1, lines)
        elif key == "hf_token":
            lines.append(f"{pad}# {key}: (from the HF_TOKEN environment variable; never written here)")
        else:
            dumped = yaml.safe_dump({key: data[key]}, default_flow_style=True, width=1000).strip()
            lines.append(f"{pad}{dumped.removeprefix('{').removesuffix('}')}")
        if indent == 0:
            lines.append("")


def render_markdown() -> str:
    """docs/config.md: every section and key with type, default and description."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `src/medtune/config.py` by `make docs` (`medtune schema`); do not edit by hand.",
        "Set keys in a YAML file (`medtune init -o medtune.yaml`) or on the command line with",
        "`--set section.key=value`. Precedence: defaults < preset < config file < `--set`.",
        "",
        "Presets (`--preset NAME`):",
        "",
    ]
    from medtune.presets import PRESET_DESCRIPTIONS

    out += [f"- `{name}`: {desc}" for name, desc in PRESET_DESCRIPTIONS.items()]
    defaults = to_dict(MedtuneConfig())
    _md_section(MedtuneConfig, defaults, "", out)
    return "\n".join(out) + "\n"


def _md_section(model: type[BaseModel], data: dict[str, Any], prefix: str, out: list[str]) -> None:
    rows = []
    for key, field in _fields(model).items():
        if _is_model(field.annotation):
            continue
        default = "from `HF_TOKEN`" if key == "hf_token" else f"`{json.dumps(data[key])}`"
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {field.description} |")
    if rows:
        out += ["", f"## `{prefix.rstrip('.')}`", "", "| key | type | default | description |", "|---|---|---|---|", *rows]
    for key, field in _fields(model).items():
        if _is_model(field.annotation):
            _md_section(field.annotation, data[key], f"{prefix}{key}.", out)


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Annotated:  # a constrained member of a union, e.g. `Annotated[int, Field(ge=1)]`
        annotation = get_args(annotation)[0]
    origin = get_origin(annotation)
    if origin is not None and str(origin).endswith("Literal"):
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if annotation is SecretStr or SecretStr in get_args(annotation):
        return "secret"
    if origin is tuple:
        return "list of str"
    if type(None) not in get_args(annotation) and len(get_args(annotation)) > 1 and origin is not dict:
        return " or ".join(_type_name(a) for a in get_args(annotation))  # a union such as `int | "auto"`
    return getattr(annotation, "__name__", str(annotation))
