"""The one SparkSession factory: master precedence, UI off, workers on this interpreter."""

from __future__ import annotations

import sys

import pytest

from fedlab.config import SparkConfig
from fedlab.spark import resolve_master, spark_conf


def test_master_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARK_MASTER", raising=False)
    assert resolve_master(None) == "local[*]"
    assert resolve_master(SparkConfig(master="spark://host:7077")) == "spark://host:7077"
    monkeypatch.setenv("SPARK_MASTER", "k8s://https://api:443")
    assert resolve_master(SparkConfig(master="yarn")) == "k8s://https://api:443"


def test_conf_is_small_data_friendly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARK_MASTER", raising=False)
    conf = spark_conf(SparkConfig(shuffle_partitions=3, conf={"spark.executor.memory": "1g"}), seed=5)
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.sql.shuffle.partitions"] == "3"
    assert conf["spark.sql.session.timeZone"] == "UTC"
    assert conf["spark.pyspark.python"] == sys.executable
    assert conf["spark.executor.memory"] == "1g"
    monkeypatch.setenv("SPARK_MASTER", "yarn")
    assert "spark.pyspark.python" not in spark_conf(None)


def test_session_is_real_and_shared(spark) -> None:
    from fedlab.spark import get_spark

    assert get_spark() is spark
    assert spark.conf.get("spark.ui.enabled") == "false"
    assert spark.range(10).selectExpr("sum(id)").collect()[0][0] == 45
