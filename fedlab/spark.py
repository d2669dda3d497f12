"""The one place a SparkSession is made: local[*] by default, UI off, sized for small data.

The master comes from, in order: the `SPARK_MASTER` environment variable, the experiment's
`spark.master`, then `local[*]`. Any master Spark accepts (`spark://`, `yarn`, `k8s://`) is
passed through unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from fedlab.logs import spark_java_options

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from fedlab.config import Experiment, SparkConfig

DEFAULT_MASTER = "local[*]"


def resolve_master(config: SparkConfig | None = None) -> str:
    return os.environ.get("SPARK_MASTER") or (config.master if config and config.master else DEFAULT_MASTER)


def spark_conf(config: SparkConfig | None = None, seed: int = 0) -> dict[str, str]:
    conf = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": config.driver_memory if config else "2g",
        "spark.sql.shuffle.partitions": str(config.shuffle_partitions if config else 4),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.driver.extraJavaOptions": f"-Duser.timezone=UTC {spark_java_options()}",
        "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.adaptive.enabled": "false",  # small per-site jobs: AQE triples the job count here
        "spark.fedlab.seed": str(seed),
    }
    if resolve_master(config).startswith("local"):
        # Python workers must run this interpreter (the venv), not whatever `python3` is on PATH.
        conf["spark.pyspark.python"] = sys.executable
        conf["spark.pyspark.driver.python"] = sys.executable
    if config:
        conf.update(config.conf)
    return conf


def get_spark(experiment: Experiment | None = None, app_name: str = "fedlab") -> SparkSession:
    """Return the running session if there is one, else start one for this experiment."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    config = experiment.spark if experiment else None
    builder = SparkSession.builder.master(resolve_master(config)).appName(app_name)
    for key, value in spark_conf(config, experiment.seed if experiment else 0).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
