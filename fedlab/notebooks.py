"""Running one notebook with papermill: a kernel of its own, figures kept, quiet terminal.

- Figures: the kernels draw with matplotlib's inline backend, so executed notebooks keep their
  plots as PNG (an `MPLBACKEND=Agg` inherited from the caller would silently drop every one).
- Quiet: the kernel process's own output (its TCP warning, a JVM's or TFF worker's start-up
  lines) goes to `reports/<run>/logs/<notebook>.log`; known-harmless lines (see `fedlab.logs`)
  are moved out of the executed notebook into the same log. The terminal shows a progress bar
  over the notebook's cells and the stage's own progress lines (those starting with `[`) and
  warnings.
- Progress bars inside the kernels are off (`TQDM_DISABLE`): a saved notebook would show them
  stuck at 0%.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from fedlab.errors import FedlabError
from fedlab.io import atomic_open
from fedlab.logs import LOG_DIR_ENV, append, split_harmless

KERNEL = "python3"
STAGE_LINE = re.compile(r"^\[[A-Za-z][\w .-]*\] ")  # a stage's own progress line, e.g. "[train] seed 0 ..."
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
KERNEL_ENV = {"MPLBACKEND": INLINE_BACKEND, "TQDM_DISABLE": "1"}


def check_parameters_cell(source: Path) -> None:
    import nbformat

    nb = nbformat.read(source, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise FedlabError(f"{source}: expected exactly one cell tagged `parameters`, found {len(tagged)}; "
                          "restore it (see the notebook's .py twin) so parameters can be injected")


def failure_message(notebook: str, err: Exception) -> str:
    cell = getattr(err, "exec_count", None)
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    where = f"cell [{cell}]" if cell is not None else "a cell"
    return f"notebook {notebook} failed in {where}: {ename}: {evalue}"


class _ProgressTap(io.TextIOBase):
    """Receives the cells' stream output as it arrives; shows the stage's own progress lines."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._show(line)
        return len(text)

    def _show(self, line: str) -> None:
        kept, _ = split_harmless(line)
        kept = kept.strip()
        if STAGE_LINE.match(kept) or "Warning" in kept or "WARNING" in kept:
            from tqdm.auto import tqdm

            tqdm.write(f"  {self.label}: {kept}", file=sys.stderr)


def _kernel_manager_logging_to(log: Path) -> type:
    """A kernel manager whose kernel process writes its stdout and stderr to `log`."""
    from jupyter_client.manager import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as handle:  # the kernel keeps its own copy of the descriptor
                kw.setdefault("stdout", handle)
                kw.setdefault("stderr", handle)
                await super().start_kernel(**kw)

    return LoggedKernelManager


def move_harmless_output(notebook: Path, log: Path) -> int:
    """Move the known-harmless lines of the notebook's stream outputs into `log`; return how many."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    moved = 0
    for cell in nb.cells:
        outputs = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                kept, harmless = split_harmless(output.get("text", ""))
                if harmless:
                    append(log, harmless)
                    moved += harmless.count("\n") or 1
                    output["text"] = kept
                if not kept:
                    continue
            outputs.append(output)
        if cell.cell_type == "code":
            cell["outputs"] = outputs
    if moved:
        with atomic_open(notebook, "w", encoding="utf-8") as handle:
            nbformat.write(nb, handle)
    return moved


def run_notebook(source: Path, output: Path, parameters: dict[str, Any], cwd: Path,
                 log_dir: Path | None = None, label: str | None = None, progress: bool = True) -> float:
    """Execute one notebook with papermill in its own kernel; return the seconds it took.

    `log_dir` (default: `logs/` beside the executed copy's folder) receives the kernel's own
    output and the harmless lines taken out of the notebook."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    check_parameters_cell(source)
    log_dir = log_dir or output.parent.parent / "logs"
    log = log_dir / f"{output.stem}.log"
    label = label or output.stem
    started = time.perf_counter()
    saved = {key: os.environ.get(key) for key in (*KERNEL_ENV, LOG_DIR_ENV)}
    os.environ.update({**KERNEL_ENV, LOG_DIR_ENV: str(log_dir)})
    bar = {"desc": label, "leave": False, "file": sys.stderr, "disable": not progress,
           "mininterval": 1.0 if sys.stderr.isatty() else 30.0}
    try:
        pm.execute_notebook(str(source), str(output), parameters=parameters, kernel_name=KERNEL, cwd=str(cwd),
                            progress_bar=bar, log_output=False, stdout_file=_ProgressTap(label),
                            stderr_file=_ProgressTap(label), kernel_manager_class=_kernel_manager_logging_to(log))
    except PapermillExecutionError as err:
        raise FedlabError(failure_message(source.name, err) + f"\n  executed copy: {output}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if output.is_file():
            move_harmless_output(output, log)
    write_html(output)
    return time.perf_counter() - started


def write_html(notebook: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    with atomic_open(notebook.with_suffix(".html"), "w", encoding="utf-8") as handle:
        handle.write(body)
