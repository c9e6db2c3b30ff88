"""Stage 2, container: which runtime and image the training processes run in.

`none` trains natively in this Python environment. The other sources yield a SIF image at
`container.finetune_path` that the finetune stage then runs in (`apptainer exec --nv`, see
launch/apptainer.py):

- `path`: the image already there (a clear error when it is missing);
- `pull`: `finetune.sif` copied from `container.bucket` (any fsspec URL), checked by size (and by
  sha256 when a SHA256SUMS lies beside it), retried with backoff;
- `build`: `apptainer build` / `singularity build` from the project's containers/finetune.def,
  as root, with `--fakeroot` where /etc/subuid maps the user, or through password-less sudo;
- `lfs`: `container.lfs_repo` cloned (a URL) or updated (a local clone) with git-lfs, then the
  split image parts (`<name>.sif.part-*`) joined in order and checked against `<name>.sif.sha256`.
Each writes the image through a temp name and one rename, and reuses an image already in place.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from medtune.checksums import file_sha256
from medtune.config import ContainerConfig
from medtune.errors import EnvironmentProblem
from medtune.transfer import Retry, get_verified, remote_sums, with_retries

log = logging.getLogger("medtune.container")

RUNTIMES = ("apptainer", "singularity")
DEFINITION = Path(__file__).resolve().parents[2] / "containers" / "finetune.def"


def container(cfg: ContainerConfig) -> dict[str, Any]:
    if cfg.source == "none":
        log.info("container: none (running natively)")
        return {"source": "none"}
    runtime = find_runtime(cfg.source)
    image = Path(cfg.finetune_path).expanduser()
    if cfg.source == "path":
        if not image.is_file():
            raise EnvironmentProblem(f"infrastructure.container.finetune_path {image} not found; point it at "
                                     "finetune.sif or use source `pull`, `build` or `lfs` to get one")
    elif cfg.source == "pull":
        pull_image(cfg.bucket, image)
    elif cfg.source == "build":
        # Built under a temp name: a build killed halfway must not leave a finetune.sif that looks usable.
        tmp = image.with_name(f".{image.name}.tmp-{os.getpid()}")
        try:
            _run(build_command(runtime, tmp, DEFINITION), "build the container", cwd=DEFINITION.parent.parent)
            os.replace(tmp, image)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        repo = sync_lfs_repo(cfg.lfs_repo, image.parent)
        assemble_parts(repo, image)
    log.info("container: %s image %s (%s)", runtime, image, cfg.source)
    return {"source": cfg.source, "runtime": runtime, "image": str(image)}


def find_runtime(source: str) -> str:
    for name in RUNTIMES:
        if shutil.which(name):
            return name
    raise EnvironmentProblem(f"infrastructure.container.source is `{source}` but neither apptainer nor singularity "
                             "is on PATH; load it (e.g. `module load apptainer`) or set infrastructure.container.source=none")


PULL_RETRY = Retry()


def pull_image(bucket: str, image: Path) -> None:
    if not bucket:
        raise EnvironmentProblem("infrastructure.container.source is `pull`: set infrastructure.container.bucket "
                                 "to the URL holding finetune.sif")
    import fsspec

    fs, base = fsspec.core.url_to_fs(bucket.rstrip("/"))
    remote = f"{base}/finetune.sif"
    if not fs.exists(remote):
        raise EnvironmentProblem(f"no finetune.sif in infrastructure.container.bucket {bucket}; upload it there")
    if image.is_file() and image.stat().st_size == fs.size(remote):
        log.info("container: %s already pulled", image)
        return
    image.parent.mkdir(parents=True, exist_ok=True)
    # Through a temp name, checked by size (and by sha256 when a SHA256SUMS lies beside it), retried.
    with_retries(lambda: get_verified(fs, remote, image, remote_sums(fs, base).get("finetune.sif")),
                 f"container: pull of {remote}", PULL_RETRY, EnvironmentProblem, "check the bucket and rerun")


def build_command(runtime: str, image: Path, definition: Path, euid: int | None = None) -> list[str]:
    """`<runtime> build` as root, with --fakeroot when the user has subordinate ids, else via sudo."""
    if not definition.is_file():
        raise EnvironmentProblem(f"container definition {definition} not found; build from a medtune checkout")
    command = [runtime, "build", "--force", str(image), str(definition)]
    if (os.geteuid() if euid is None else euid) == 0:
        return command
    if _has_subuid(getpass.getuser()):
        return [runtime, "build", "--fakeroot", *command[2:]]
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", *command]
    raise EnvironmentProblem(f"`{runtime} build` needs root, --fakeroot (an /etc/subuid entry) or password-less "
                             "sudo; build finetune.sif elsewhere and use source `path` or `pull`")


def _has_subuid(user: str, subuid: Path = Path("/etc/subuid")) -> bool:
    return subuid.is_file() and any(line.split(":")[0] == user for line in subuid.read_text().splitlines())


def sync_lfs_repo(repo: str, clones: Path) -> Path:
    """A local clone of `repo` with its LFS files present: cloned once (URL) or pulled (local clone)."""
    if shutil.which("git") is None or subprocess.run(["git", "lfs", "version"], capture_output=True).returncode:
        raise EnvironmentProblem("infrastructure.container.source is `lfs` but git-lfs is not installed; "
                                 "install it (`apt-get install git-lfs`) or use another source")
    local = Path(repo).expanduser()
    if (local / ".git").exists():
        _run(["git", "-C", str(local), "pull", "--ff-only"], "update the container repository")
        _run(["git", "-C", str(local), "lfs", "pull"], "fetch the container image parts")
        return local
    if "://" not in repo and not repo.endswith(".git"):
        raise EnvironmentProblem(f"infrastructure.container.lfs_repo {repo} is neither a git clone nor a URL; "
                                 "clone the container repository there or give its URL")
    clone = clones / f"lfs-{Path(repo.rstrip('/')).stem}"
    if not (clone / ".git").exists():
        _run(["git", "clone", "--quiet", repo, str(clone)], "clone the container repository")
    _run(["git", "-C", str(clone), "lfs", "pull"], "fetch the container image parts")
    return clone


def assemble_parts(folder: Path, image: Path) -> Path:
    """Join `<image name>.part-*` from `folder` in order into `image`; its sha256 must match `<name>.sha256`."""
    parts = sorted(folder.glob(f"{image.name}.part-*"), key=lambda p: (len(p.name), p.name))
    sums = folder / f"{image.name}.sha256"
    if not parts or not sums.is_file():
        raise EnvironmentProblem(f"{folder} has no {image.name}.part-* files with a {image.name}.sha256 beside "
                                 "them; check infrastructure.container.lfs_repo")
    expected = sums.read_text().split()[0].lower()
    if image.is_file() and file_sha256(image) == expected:
        log.info("container: %s already assembled", image)
        return image
    image.parent.mkdir(parents=True, exist_ok=True)
    tmp = image.with_name(f".{image.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 24)
    actual = file_sha256(tmp)
    if actual != expected:
        tmp.unlink()
        raise EnvironmentProblem(f"assembled {image.name} has sha256 {actual[:12]}…, expected {expected[:12]}… "
                                 f"({len(parts)} parts); run `git lfs pull` in the container repository and retry")
    os.replace(tmp, image)
    log.info("container: assembled %s from %d parts (sha256 ok)", image, len(parts))
    return image


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    log.info("container: %s", " ".join(command))
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EnvironmentProblem(f"could not {what}: `{' '.join(command[:3])} …` failed: {last[0]}")
