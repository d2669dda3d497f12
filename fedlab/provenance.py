"""Where a run's code came from: the git commit and whether any tracked file differs from it.

Reading this must never fail or slow a run. `git status` is not used: it runs the notebooks'
content filter (one Python start-up per notebook, minutes on a loaded machine when a fresh
clone's index is racily clean). Instead git is asked only for the commit and its tree (no filters
involved, each call bounded by a timeout), and the working files are hashed here the way git
hashes blobs. A notebook whose bytes differ is compared again after stripping its outputs, as the
project's filter does, so a notebook that was only executed in place does not count as a change.
Anything that cannot be read in time is recorded as unknown, with the reason.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

GIT_TIMEOUT_SECONDS = 10.0
HASHING_BUDGET_SECONDS = 10.0
MAX_LISTED_CHANGES = 20


class _Unknown(Exception):
    """The git state cannot be read; the message says why."""


def _git(root: Path, *args: str) -> bytes:
    """Run git in its own process group, so that on timeout git and anything it started are killed
    and cannot keep the output pipes open."""
    timeout = GIT_TIMEOUT_SECONDS
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0"}
    try:
        proc = subprocess.Popen(["git", *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    except FileNotFoundError:
        raise _Unknown("git is not installed") from None
    except OSError as err:
        raise _Unknown(f"`git {' '.join(args)}` could not run: {err}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise _Unknown(f"`git {' '.join(args)}` did not answer within {timeout:g} s") from None
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise _Unknown(f"`git {' '.join(args)}` failed: {message[0] if message else proc.returncode}")
    return out


def blob_id(data: bytes) -> str:
    """The id git gives a file's content (SHA-1 of `blob <size>\\0<data>`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _tracked_files(root: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode, blob id) for every file in HEAD's tree."""
    listing = _git(root, "ls-tree", "-r", "-z", "--full-tree", "HEAD")
    files = {}
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        meta, path = entry.split(b"\t", 1)
        mode, kind, object_id = meta.decode().split()
        if kind == "blob":
            files[path.decode(errors="surrogateescape")] = (mode, object_id)
    return files


def _stripped_notebook(data: bytes) -> bytes | None:
    """The notebook as the project's clean filter writes it, or None if it cannot be read."""
    try:
        import io

        import nbformat
        from nbstripout import strip_output

        notebook = nbformat.reads(data.decode("utf-8"), as_version=nbformat.NO_CONVERT)
        stripped = strip_output(notebook, keep_output=False, keep_count=False, keep_id=True)
        out = io.StringIO()
        nbformat.write(stripped, out)
        return out.getvalue().encode("utf-8")
    except Exception:  # noqa: BLE001 - an unreadable notebook simply counts as changed
        return None


def _differs(path: Path, mode: str, object_id: str) -> bool:
    if mode == "120000":
        return not path.is_symlink() or blob_id(os.readlink(path).encode()) != object_id
    if not path.is_file():
        return True
    data = path.read_bytes()
    if blob_id(data) == object_id:
        return False
    if path.suffix == ".ipynb":
        stripped = _stripped_notebook(data)
        return stripped is None or blob_id(stripped) != object_id
    return True


def changed_files(root: Path, budget: float = HASHING_BUDGET_SECONDS) -> list[str]:
    """Tracked files whose content differs from HEAD (deleted ones included), in path order."""
    deadline = time.monotonic() + budget
    changed = []
    for name, (mode, object_id) in sorted(_tracked_files(root).items()):
        if time.monotonic() > deadline:
            raise _Unknown(f"comparing the working tree with HEAD took more than {budget:g} s")
        if mode == "160000":  # a submodule: its own repository
            continue
        if _differs(root / name, mode, object_id):
            changed.append(name)
    return changed


def git_state(root: Path) -> dict[str, Any]:
    """`{"commit", "dirty", "changed"}`, or with `dirty: None` and a `reason` when unknown."""
    try:
        commit = _git(root, "rev-parse", "--verify", "HEAD").decode().strip()
    except _Unknown as err:
        return {"commit": None, "dirty": None, "reason": str(err)}
    try:
        changed = changed_files(root)
    except _Unknown as err:
        return {"commit": commit, "dirty": None, "reason": str(err)}
    state: dict[str, Any] = {"commit": commit, "dirty": bool(changed)}
    if changed:
        state["changed"] = changed[:MAX_LISTED_CHANGES]
        state["n_changed"] = len(changed)
    return state
