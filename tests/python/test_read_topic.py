"""read_topic.py against the real broker: what a test sees of a topic."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import requests
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


READ_TOPIC = Path(__file__).resolve().parent / "read_topic.py"

INSIGHT_SCHEMA = {
    "type": "record",
    "name": "Insight",
    "namespace": "test",
    "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "score", "type": ["null", "double"], "default": None},
        {"name": "raw", "type": "bytes"},
    ],
}


def run_reader(bootstrap: str, topic: str, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    done = subprocess.run(
        [sys.executable, str(READ_TOPIC), topic, "--bootstrap", bootstrap, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, records, done.stderr


def register(registry: str, subject: str, schema: dict[str, Any]) -> int:
    response = requests.post(
        f"{registry}/subjects/{subject}/versions",
        json={"schema": json.dumps(schema)},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()["id"]


def wire_avro(schema_id: int, schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return b"\x00" + struct.pack(">I", schema_id) + buf.getvalue()


def transactional_producer(bootstrap: str) -> Producer:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"pytest-{uuid.uuid4()}",
            "enable.idempotence": True,
        }
    )
    producer.init_transactions(60)
    return producer


def test_committed_json_and_avro_records_are_read_and_aborted_ones_are_not(
    bootstrap: str, new_topic: Callable[..., str], registry: str
) -> None:
    topic = new_topic()
    schema_id = register(registry, f"{topic}-value", INSIGHT_SCHEMA)

    plain = Producer({"bootstrap.servers": bootstrap})
    plain.produce(topic, key=b"u-1", value=json.dumps({"n": 1}), headers=[("kind", b"json")])
    plain.produce(topic, key=b"u-2", value=json.dumps({"n": 2}), headers=[("kind", b"json")])
    assert plain.flush(30) == 0

    txn = transactional_producer(bootstrap)
    txn.begin_transaction()
    avro_records = [
        {"user_id": "u-3", "score": 0.5, "raw": b"\x01\x02"},
        {"user_id": "u-4", "score": None, "raw": b""},
    ]
    for record in avro_records:
        txn.produce(
            topic,
            key=record["user_id"].encode(),
            value=wire_avro(schema_id, INSIGHT_SCHEMA, record),
            headers=[("kind", b"avro"), ("trace", b"a"), ("trace", b"b")],
        )
    txn.commit_transaction(60)

    txn.begin_transaction()
    txn.produce(topic, key=b"aborted-1", value=json.dumps({"aborted": True}))
    txn.produce(topic, key=b"aborted-2", value=json.dumps({"aborted": True}))
    txn.flush(30)
    txn.abort_transaction(60)

    txn.begin_transaction()
    txn.produce(topic, key=b"u-5", value=json.dumps({"n": 5}))
    txn.commit_transaction(60)

    code, records, stderr = run_reader(bootstrap, topic, "--registry", registry, "--idle", "3")

    assert code == 0, stderr
    assert [r["key"] for r in records] == ["u-1", "u-2", "u-3", "u-4", "u-5"]
    # Offsets 4 and 7 are transaction markers, 5 and 6 the aborted records.
    assert [r["offset"] for r in records] == [0, 1, 2, 3, 8]
    assert [r["value"] for r in records] == [
        {"n": 1},
        {"n": 2},
        {"user_id": "u-3", "score": 0.5, "raw": {"base64": "AQI="}},
        {"user_id": "u-4", "score": None, "raw": {"base64": ""}},
        {"n": 5},
    ]
    assert records[0]["headers"] == {"kind": "json"}
    assert records[2]["headers"] == {"kind": "avro", "trace": ["a", "b"]}
    assert all(r["topic"] == topic and r["partition"] == 0 for r in records)
    assert all(isinstance(r["timestamp"], int) and r["timestamp"] > 0 for r in records)


def test_values_from_the_confluent_avro_serializer_decode_through_the_registry(
    bootstrap: str, new_topic: Callable[..., str], registry: str
) -> None:
    topic = new_topic()
    serializer = AvroSerializer(
        SchemaRegistryClient({"url": registry}), json.dumps(INSIGHT_SCHEMA)
    )
    producer = Producer({"bootstrap.servers": bootstrap})
    record = {"user_id": "u-9", "score": 1.25, "raw": b"xyz"}
    value = serializer(record, SerializationContext(topic, MessageField.VALUE))
    producer.produce(topic, key=b"u-9", value=value)
    assert producer.flush(30) == 0

    code, records, stderr = run_reader(
        bootstrap, topic, "--registry", registry, "--expect", "1", "--idle", "30"
    )

    assert code == 0, stderr
    assert records[0]["value"] == {"user_id": "u-9", "score": 1.25, "raw": {"base64": "eHl6"}}
    assert f"{topic}-value" in requests.get(f"{registry}/subjects", timeout=10).json()


def test_reading_stops_at_expect_and_reports_a_shortfall(
    bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    for n in range(6):
        producer.produce(topic, partition=n % 2, key=str(n).encode(), value=json.dumps(n))
    assert producer.flush(30) == 0

    code, records, _ = run_reader(bootstrap, topic, "--expect", "6", "--idle", "30")
    assert code == 0
    assert sorted(r["value"] for r in records) == [0, 1, 2, 3, 4, 5]
    assert {r["partition"] for r in records} == {0, 1}

    code, records, stderr = run_reader(bootstrap, topic, "--expect", "9", "--idle", "2")
    assert code == 0
    assert len(records) == 6
    assert "expected 9 records" in stderr

    code, records, stderr = run_reader(bootstrap, topic, "--expect", "9", "--idle", "2", "--strict")
    assert code == 3
    assert len(records) == 6


def test_keys_stay_text_even_when_they_look_like_json_and_topic_may_be_a_flag(
    bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic()
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"12345", value=b"{}")
    producer.produce(topic, key=b"\xff", value=b"{}")
    producer.produce(topic, value=b"{}")
    assert producer.flush(30) == 0

    done = subprocess.run(
        [
            sys.executable,
            str(READ_TOPIC),
            "--topic",
            topic,
            "--bootstrap",
            bootstrap,
            "--expect",
            "3",
            "--idle",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    keys = [json.loads(line)["key"] for line in done.stdout.splitlines()]
    assert keys == ["12345", {"base64": "/w=="}, None]


def test_tombstones_binary_values_and_multi_megabyte_records_round_trip(
    bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic()
    big = {"sms": "x" * (6 * 1024 * 1024)}
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 16 * 1024 * 1024})
    producer.produce(topic, key=b"big", value=json.dumps(big))
    producer.produce(topic, key=b"gone", value=None)
    producer.produce(topic, key=b"bin", value=b"\xff\xfe\x00")
    producer.produce(topic, key=b"text", value=b"not json")
    assert producer.flush(60) == 0

    code, records, stderr = run_reader(bootstrap, topic, "--expect", "4", "--idle", "30")

    assert code == 0, stderr
    assert records[0]["value"] == big
    assert records[1]["value"] is None
    assert records[2]["value"] == {"base64": "//4A"}
    assert records[3]["value"] == "not json"


def test_a_missing_topic_is_an_error_not_an_empty_read(bootstrap: str) -> None:
    code, records, stderr = run_reader(bootstrap, f"missing-{uuid.uuid4().hex}", "--idle", "1")
    assert code == 2
    assert records == []
    assert "read_topic:" in stderr
