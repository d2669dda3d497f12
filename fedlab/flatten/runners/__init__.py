"""Flatten runners: where a site's lines are read, checked and flattened, behind one interface.

A runner takes a site's inputs (`Source`s), an engine class and a staging folder; it writes the
five tables into the folder and returns `Written`: the content of `harmonization.json`, the
quarantined lines and the rows per table. Every runner keeps the same books (`fedlab.flatten.ledger`)
and derives the same tables (`fedlab.flatten.derive`); they differ in where the work runs:

- `pandas` (`runners/local.py`): everything in this process; each table is one Parquet file;
- `spark` (`runners/spark.py`): executors parse, check and flatten the lines, the driver keeps the
  books in file order and writes what the local runner writes;
- `spark-distributed` (`runners/distributed.py`): rows never reach the driver; each table is a
  Parquet dataset (a folder of part files).

The Spark runners need a `RowEngine`. Your own runner: a subclass of `Runner`, named in YAML as
`flatten.runner: path/to/file.py:MyRunner` or `package.module:MyRunner`, or registered with
`RUNNERS.register(name, MyRunner)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedlab.flatten.engines import Engine, RowEngine
from fedlab.registry import Registry, RegistryError

if TYPE_CHECKING:
    from fedlab.flatten.readers import Source


@dataclass
class Written:
    """What a runner leaves for the stage to record: no table rows."""

    report: dict[str, Any]  # the content of harmonization.json
    quarantine: list[dict[str, Any]]
    counts: dict[str, int]  # rows per table
    write_seconds: float = 0.0


class Runner(ABC):
    """Reads, checks and flattens a site's inputs with an engine, and writes its tables."""

    name: ClassVar[str] = ""
    needs_spark: ClassVar[bool] = False

    def supports(self, engine: type[Engine]) -> bool:
        """Whether this runner can run `engine`."""
        return True

    @abstractmethod
    def run(self, sources: list[Source], engine: type[Engine], folder: Path, spark: Any = None) -> Written:
        """Flatten `sources` and write the tables into `folder` (a staging folder)."""


class SparkRunner(Runner):
    """A runner whose per-line work runs on Spark executors: it needs a session and a `RowEngine`."""

    needs_spark = True

    def supports(self, engine: type[Engine]) -> bool:
        return issubclass(engine, RowEngine)


def _not_a_runner(found: Any) -> str | None:
    if isinstance(found, type) and issubclass(found, Runner):
        return None
    return f"{found!r} is not a subclass of fedlab.flatten.runners.Runner"


RUNNERS: Registry[type[Runner]] = Registry(
    "flatten runner",
    {"pandas": "fedlab.flatten.runners.local:LocalRunner", "spark": "fedlab.flatten.runners.spark:SparkLinesRunner",
     "spark-distributed": "fedlab.flatten.runners.distributed:DistributedRunner"},
    check=_not_a_runner)


def make_runner(name: str, root: Path | None = None) -> Runner:
    """The runner `flatten.runner` names; FlattenError when it names none."""
    from fedlab.flatten.contract import FlattenError

    try:
        return RUNNERS.get(name, root)()
    except RegistryError as error:
        raise FlattenError(str(error)) from None
