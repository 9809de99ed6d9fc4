"""Fixtures for the fault suite: one Cluster per test session of this package (a fresh Postgres database
behind a TcpProxy, a private Redis, `svfit api` and two workers), healed before each test and cleared of
unfinished jobs after it, so one test's wreckage never becomes the next test's fault.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.tiny_models import build_tiny
from testkit.databases import fresh_postgres_database
from tests.faults.checks import ReferenceRuns
from tests.faults.cluster import BASE_MODEL, Cluster, training_file
from tests.faults.redis_server import RedisServer
from tests.faults.tcp_proxy import TcpProxy
from tests.network import free_port


@pytest.fixture(scope="package")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fault-models")
    build_tiny("llama", "causal", root).rename(root / BASE_MODEL)
    return root


@pytest.fixture(scope="package")
def train_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return training_file(tmp_path_factory.mktemp("fault-data") / "train.jsonl")


@pytest.fixture(scope="package")
def references(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, train_jsonl: Path) -> ReferenceRuns:
    return ReferenceRuns(tmp_path_factory.mktemp("fault-references"), models_dir, train_jsonl)


@pytest.fixture(scope="package")
def fault_database() -> Iterator[str]:
    """A fresh, migrated Postgres database (direct URL), dropped afterwards."""
    with fresh_postgres_database("svfit_faults") as url:
        yield url


@pytest.fixture(scope="package")
def running_cluster(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, fault_database: str
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("fault-cluster")
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    redis = RedisServer(free_port(), root / "redis.log").start()
    cluster = Cluster(root, models_dir, fault_database, proxy, redis)
    try:
        cluster.heal()
        yield cluster
    finally:
        cluster.stop()
        redis.kill()
        proxy.close()


@pytest.fixture
def cluster(running_cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with every part up, no fault armed and no job left over."""
    running_cluster.disarm()
    running_cluster.heal()
    yield running_cluster
    running_cluster.disarm()
    running_cluster.cancel_unfinished()


@pytest.fixture(scope="package")
def file_id(running_cluster: Cluster, train_jsonl: Path) -> str:
    """The training file, uploaded once through the API."""
    return running_cluster.upload(train_jsonl)
