"""scripts/kafka.sh on a broker of its own: start, status, restart, stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from read_topic import read_topic

KAFKA = Path(__file__).resolve().parents[2] / "scripts" / "kafka.sh"


def kafka(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KAFKA), *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_restart_keeps_port_and_data_and_stop_really_stops(tmp_path: Path) -> None:
    directory = str(tmp_path / "broker")
    started = kafka("start", "--dir", directory)
    try:
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip()
        assert (tmp_path / "broker" / "bootstrap").read_text().strip() == bootstrap
        assert kafka("status", "--dir", directory).stdout.startswith("running pid=")

        topic = f"script-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=60)
        producer = Producer({"bootstrap.servers": bootstrap})
        for n in range(3):
            producer.produce(topic, value=json.dumps(n))
        assert producer.flush(30) == 0

        restarted = kafka("restart", "--dir", directory)
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.strip() == bootstrap

        records = read_topic(bootstrap, topic, expect=3, idle=30)
        assert [r["value"] for r in records] == [0, 1, 2]
    finally:
        stopped = kafka("stop", "--dir", directory)

    assert stopped.returncode == 0, stopped.stderr
    status = kafka("status", "--dir", directory)
    assert (status.returncode, status.stdout.strip()) == (1, "stopped")
    host, port = bootstrap.split(":")
    with socket.socket() as probe:
        assert probe.connect_ex((host, int(port))) != 0, "port still open after stop"


def test_start_refuses_a_port_that_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = kafka("start", "--dir", str(tmp_path / "b"), "--port", port)
    assert result.returncode != 0
    assert f"port {port} is already in use" in result.stderr
    assert not (tmp_path / "b" / "pid").exists()


def test_a_broker_that_cannot_start_fails_fast_and_shows_its_log(tmp_path: Path) -> None:
    env = {**os.environ, "KAFKA_HEAP_MAX": "1k"}
    began = time.monotonic()
    result = subprocess.run(
        [str(KAFKA), "start", "--dir", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode != 0
    assert "broker process exited during startup" in result.stderr
    # The JVM's own complaint, copied from broker.log.
    assert "heap size" in result.stderr
    assert time.monotonic() - began < 60
    assert not (tmp_path / "bad" / "pid").exists()


def test_cluster_ids_never_start_with_a_dash() -> None:
    # The storage tool parses "-t -abc..." as an unknown option; one random id
    # in 64 would start that way. 1,000 draws miss such a bug with odds of
    # about 1 in 10**7.
    draws = subprocess.run(
        [
            "bash",
            "-c",
            f'source <(sed -n "/^random_cluster_id()/,/^}}/p" "{KAFKA}"); '
            "for _ in $(seq 1000); do random_cluster_id; done",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert len(draws) == 1000
    assert all(len(d) == 22 for d in draws)
    assert not [d for d in draws if d.startswith("-")]
    assert len(set(d[0] for d in draws)) > 32  # still random in the first character
