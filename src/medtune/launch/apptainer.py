"""The command prefix that runs the training processes inside the container image.

`apptainer exec --nv` (or singularity) makes the host's NVIDIA driver visible inside; the run
directory and the base model are bound at their own paths so the ranks read and write the same
files as outside. The environment passes through unchanged (HF_TOKEN included, never on argv).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def exec_prefix(container: dict[str, Any], binds: list[Path]) -> list[str]:
    """[] without an image; else `<runtime> exec --nv --bind a,b <image>`."""
    if not container.get("image"):
        return []
    paths = sorted({str(Path(p).resolve()) for p in binds})
    return [container["runtime"], "exec", "--nv", "--bind", ",".join(paths), container["image"]]
