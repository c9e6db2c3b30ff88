"""User-facing errors: each one is a single line saying what is wrong and how to fix it.

The CLI maps every `MedtuneError` to exit code 2 and prints only its message (no traceback unless
`--debug`). Anything else escaping a stage is a bug in medtune, not a user mistake.
"""


class MedtuneError(Exception):
    """A problem the user can fix. `str(err)` is the whole message: what is wrong, then the fix."""

    exit_code = 2


class ConfigError(MedtuneError):
    """The configuration is invalid (unknown key, bad value, contradictory settings)."""


class DataError(MedtuneError):
    """The dataset cannot be read or does not have the shape the config asks for."""


class ModelError(MedtuneError):
    """The base model cannot be found, downloaded or loaded."""


class EnvironmentProblem(MedtuneError):
    """The machine cannot run this config (no GPU where one is needed, missing library, disk)."""


class RunDirError(MedtuneError):
    """The run directory cannot be created, read or written."""
