"""Output folders a user can trust: one writer at a time, no silent overwrite, a manifest that can be verified.

- :func:`output_lock` -- a lock file ``.<name>.lock`` next to the output folder, held with ``flock`` for the whole
  run and naming its holder (pid, host, start time). A second run to the same output is refused at once. The
  kernel drops the lock when its process dies (even ``kill -9``), so a lock file left behind by a dead run is stale
  and simply taken over; nothing has to be cleaned up by hand.
- :func:`check_output` -- the output policy: never the source model (an output that is, contains, lies inside of or
  links to it is refused, ``overwrite`` or not); a missing or empty folder is fine; an existing complete output of the
  *same* configuration (manifest present, same config hash and source model) is replaced by the identical result
  (so rerunning a finished command is harmless); anything else is refused unless ``overwrite`` is set explicitly.
- :func:`manifest_files` / :func:`verify_dir` -- ``manifest.json`` lists the sha256 of every file of the folder
  and carries the resolved recipe; ``verify_dir`` recomputes everything (``surgeon verify DIR``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .config import PruneConfig, load_yaml
from .errors import SurgeonError
from .integrity import open_lock_file
from .utils import sha256_file

__all__ = ["MANIFEST", "lock_path", "output_lock", "check_output", "check_not_source", "check_writable",
           "holds_export", "manifest_files", "verify_dir"]

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------- lock

def lock_path(output: str | os.PathLike) -> Path:
    """``/a/b/out`` -> ``/a/b/.out.lock`` (beside the folder: the folder itself appears only at the end)."""
    out = Path(output).expanduser().resolve()
    return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold the output folder's lock for the duration of the block; raise :class:`SurgeonError` if another live
    run holds it. The lock file is removed on exit (also on errors); one left by a killed run is taken over."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = open_lock_file(path)  # never through a symlink: the holder's line would overwrite its target
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise SurgeonError(f"output {Path(output).expanduser()} is being written by another run "
                               f"({_holder(path)}); wait for it or choose another output") from None
        # the file may have been unlinked by its previous holder between our open() and flock(): retry then
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        _remove_stale_partials(Path(output))
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # unlink before unlocking: a waiter that opened the old file re-checks the inode
        os.close(fd)


def _remove_stale_partials(output: Path) -> None:
    """Temporary folders of an earlier write of ``output`` (``.NAME.*.partial`` / ``.old``), left by a writer that
    was killed; called with the output's lock held, so their writer is gone."""
    out = output.expanduser().resolve()
    for pattern in (f".{out.name}.*.partial", f".{out.name}.*.old"):
        for stale in out.parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- policy

def check_writable(output: str | os.PathLike) -> Path:
    """The output can be created: its nearest existing ancestor is a writable folder. Creates nothing."""
    out = Path(output).expanduser()
    # the longest name written beside the output: ".NAME.<8 random>.partial" (atomic_dir)
    longest = len(f".{out.resolve().name}.12345678.partial".encode())
    existing = out.resolve()
    while not existing.exists():
        existing = existing.parent
    with contextlib.suppress(OSError, ValueError):
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        if longest > name_max:
            raise SurgeonError(f"output name {out.name[:40]}... is {len(out.name)} characters: name too long "
                               f"(its temporary folder needs {longest} of the file system's {name_max} bytes)")
    if existing != out.resolve() and not existing.is_dir():
        raise SurgeonError(f"cannot create output {out}: {existing} is not a folder")
    if existing == out.resolve() and not out.is_dir():
        raise SurgeonError(f"output {out} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SurgeonError(f"cannot create output {out}: {existing} is not writable")
    return out


def _read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_not_source(output: str | os.PathLike, sources: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is, contains, lies inside of or links to a source model (symlinks resolved): writing
    it would replace or delete the model being pruned. ``overwrite`` does not lift this."""
    out = Path(output).expanduser().resolve()
    for source in sources:
        if source is None or not Path(source).expanduser().exists():
            continue  # a registered name or random:ARCH is no path; its resolved folder is checked too
        src = Path(source).expanduser().resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            how = "is" if out == src else "contains" if src.is_relative_to(out) else "is inside"
            raise SurgeonError(f"output {Path(output).expanduser()} {how} the source model {src}: writing it "
                               "would overwrite or delete the model being pruned; choose another output")


def check_output(output: str | os.PathLike, *, config_hash: str, source_model: str | None = None,
                 overwrite: bool = False, sources: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output folder that would lose someone's files (see the module docstring): the source model's
    (``sources``: its reference and resolved folder) always. Creates nothing."""
    check_not_source(output, sources)
    out = check_writable(output)
    if not out.exists() or overwrite or not any(out.iterdir()):
        return out
    manifest = _read_manifest(out)
    if manifest is None:
        raise SurgeonError(f"output {out} is not empty and is not a surgeon output; choose another folder or "
                           "pass --overwrite (recipe key overwrite: true)")
    same = manifest.get("config_hash") == config_hash and (
        source_model is None or manifest.get("source_model_hash") in (None, source_model))
    if not same:
        raise SurgeonError(f"output {out} holds a pruned model of another recipe (config {manifest.get('config_hash')}, "
                           f"this one {config_hash}); choose another folder or pass --overwrite")
    return out


def holds_export(output: str | os.PathLike, **expected) -> bool:
    """Whether ``output`` already is an export whose manifest has every ``expected`` value and whose files all
    have the hashes it records (the weights' finiteness is not re-read)."""
    out = Path(output).expanduser()
    manifest = _read_manifest(out)
    if manifest is None or any(manifest.get(k) != v for k, v in expected.items()):
        return False
    try:
        return verify_dir(out, check_weights=False)["ok"]
    except SurgeonError:
        return False


# ----------------------------------------------------------------------------------------------- manifest

def manifest_files(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of ``folder`` (recursively, relative POSIX paths), the manifest itself excluded."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): sha256_file(p, use_cache=False)
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != MANIFEST}


def verify_dir(folder: str | os.PathLike, *, check_weights: bool = True) -> dict:
    """Recompute a pruned folder's hashes against its manifest, check its recipe and (optionally) that every
    weight is finite. Returns ``{"ok", "problems": [one line each], "files", "config_hash"}``; raises
    :class:`SurgeonError` when ``folder`` is not a surgeon output at all."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SurgeonError(f"not a folder: {root}")
    if not (root / MANIFEST).is_file():
        raise SurgeonError(f"{root} has no {MANIFEST}: not a surgeon prune output")
    manifest = _read_manifest(root)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        raise SurgeonError(f"{root / MANIFEST} is corrupt (not a JSON manifest with a 'files' table)")
    problems: list[str] = []
    expected: dict = manifest["files"]
    actual = manifest_files(root)
    for name in sorted(expected.keys() - actual.keys()):
        problems.append(f"missing file {name}")
    for name in sorted(actual.keys() - expected.keys()):
        problems.append(f"unexpected file {name} (not in the manifest)")
    for name in sorted(expected.keys() & actual.keys()):
        if expected[name] != actual[name]:
            problems.append(f"{name} differs: sha256 {actual[name][:16]}..., manifest {str(expected[name])[:16]}...")
    recipe_file = root / "recipe.yaml"
    if recipe_file.is_file():
        try:
            recipe = load_yaml(recipe_file.read_text(encoding="utf-8"))
            cfg = PruneConfig(**recipe)
        except Exception as exc:  # noqa: BLE001 - any parse/validation failure is one reported problem
            problems.append(f"recipe.yaml is not a valid recipe: {' '.join(str(exc).split())[:200]}")
        else:
            if manifest.get("config_hash") and cfg.config_hash() != manifest["config_hash"]:
                problems.append(f"recipe.yaml gives config hash {cfg.config_hash()}, manifest says "
                                f"{manifest['config_hash']}")
            if "recipe" in manifest and manifest["recipe"] != recipe:
                keys = sorted(k for k in set(recipe) | set(manifest["recipe"])
                              if recipe.get(k) != manifest["recipe"].get(k))
                problems.append(f"recipe.yaml differs from the manifest's recipe in: {', '.join(keys)}")
    else:
        problems.append("missing recipe.yaml")
    if check_weights:
        problems += _nonfinite_weights(root)
    return {"ok": not problems, "problems": problems, "files": len(actual), "config_hash": manifest.get("config_hash"),
            "path": str(root)}


def _nonfinite_weights(root: Path) -> list[str]:
    out = []
    for f in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    t = st.get_tensor(key)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        out.append(f"{f.name}: tensor {key} holds NaN/Inf")
        except Exception as exc:  # noqa: BLE001 - a corrupt file is reported (its hash differs too)
            out.append(f"{f.name} cannot be read: {' '.join(str(exc).split())[:200]}")
    return out
