"""Fixtures shared by the Python tests: a real Kafka broker, fresh topics and
a real schema registry (Apicurio Registry's Confluent API).

The broker and the registry are the ones scripts/test.sh started
(KAFKA_BOOTSTRAP, TEST_SCHEMA_REGISTRY); when pytest runs on its own, each
is started here with scripts/kafka.sh / scripts/registry.sh and stopped at
the end of the session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    with tempfile.TemporaryDirectory(prefix="pytest-kafka-") as tmp:
        kafka = REPO / "scripts" / "kafka.sh"
        started = subprocess.run(
            [str(kafka), "start", "--dir", tmp], check=True, capture_output=True, text=True
        )
        try:
            yield started.stdout.strip()
        finally:
            subprocess.run([str(kafka), "stop", "--dir", tmp], check=False)


@pytest.fixture(scope="session")
def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


@pytest.fixture
def new_topic(admin: AdminClient) -> Callable[..., str]:
    """Creates a uniquely named topic (auto-creation is off on the broker)."""

    def create(partitions: int = 1) -> str:
        name = f"pytest-{uuid.uuid4().hex[:12]}"
        futures = admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=30)
        futures[name].result(timeout=60)
        return name

    return create


@pytest.fixture(scope="session")
def registry() -> Iterator[str]:
    """The registry's Confluent API URL. Shared by the session: tests use
    subjects named after their own fresh topics."""
    existing = os.environ.get("TEST_SCHEMA_REGISTRY")
    if existing:
        yield existing
        return
    with tempfile.TemporaryDirectory(prefix="pytest-registry-") as tmp:
        script = REPO / "scripts" / "registry.sh"
        started = subprocess.run(
            [str(script), "start", "--dir", tmp], check=True, capture_output=True, text=True
        )
        try:
            yield started.stdout.strip()
        finally:
            subprocess.run([str(script), "stop", "--dir", tmp], check=False)
