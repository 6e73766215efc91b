"""Reads a whole Kafka topic, independently of the service, for tests.

Consumes every partition of one topic from the beginning with
isolation.level=read_committed (records of aborted or open transactions are
never shown) and without joining a consumer group, and prints one JSON
object per record:

    {"topic", "partition", "offset", "key", "headers": {...}, "value", "timestamp"}

Values are decoded as Confluent wire-format Avro (magic byte 0, 4-byte
big-endian schema id, Avro binary) when they start with the magic byte and
--registry is given, otherwise as JSON, otherwise as UTF-8 text, and as
{"base64": ...} when they are none of these. Keys are UTF-8 text (or
{"base64": ...}) unless --key-format says otherwise. Header values are UTF-8
text or {"base64": ...}; a header name that repeats maps to a list.

Reading stops when --expect N records have been seen or when no new record
arrived for --idle seconds. A shortfall is reported on stderr; with
--strict it also makes the exit status 3. Exit status 2 means a usage or
connection error (for example a missing topic).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import decimal
import io
import json
import os
import struct
import sys
import time
import uuid
from typing import Any

import fastavro
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

MAGIC = 0


class SchemaCache:
    """Fetches writer schemas by id from a Confluent-compatible registry."""

    def __init__(self, url: str | None):
        self.url = url.rstrip("/") if url else None
        self.parsed: dict[int, Any] = {}

    def get(self, schema_id: int) -> Any:
        if schema_id not in self.parsed:
            if self.url is None:
                raise LookupError("no --registry given")
            response = requests.get(f"{self.url}/schemas/ids/{schema_id}", timeout=10)
            response.raise_for_status()
            self.parsed[schema_id] = fastavro.parse_schema(json.loads(response.json()["schema"]))
        return self.parsed[schema_id]


def opaque(data: bytes) -> dict[str, str]:
    return {"base64": base64.b64encode(data).decode("ascii")}


def decode_avro(data: bytes, schemas: SchemaCache) -> Any:
    (schema_id,) = struct.unpack(">I", data[1:5])
    schema = schemas.get(schema_id)
    return fastavro.schemaless_reader(io.BytesIO(data[5:]), schema, schema)


def decode(data: bytes | None, schemas: SchemaCache, fmt: str) -> Any:
    if data is None:
        return None
    if fmt == "raw":
        return opaque(data)
    if fmt == "text":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return opaque(data)
    looks_avro = len(data) >= 5 and data[0] == MAGIC and schemas.url is not None
    if fmt == "avro":
        return decode_avro(data, schemas)
    if fmt == "auto" and looks_avro:
        # Only a guess: a dead-lettered copy of a poison record may start
        # like Avro without being any (its schema id unknown, its datum
        # broken). Such a value is shown as it is.
        try:
            return decode_avro(data, schemas)
        except Exception:  # noqa: BLE001
            return opaque(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return opaque(data)
    if fmt in ("auto", "json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if fmt == "json":
                raise
    return text


def header_map(headers: list[tuple[str, bytes | None]] | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, raw in headers or []:
        if raw is None:
            value: Any = None
        else:
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = opaque(raw)
        if name in result:
            previous = result[name]
            result[name] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            result[name] = value
    return result


def to_json(value: Any) -> Any:
    """json.dumps fallback for the Python types fastavro produces."""
    if isinstance(value, bytes):
        return opaque(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def read_topic(
    bootstrap: str,
    topic: str,
    registry: str | None = None,
    idle: float = 5.0,
    expect: int | None = None,
    value_format: str = "auto",
    key_format: str = "text",
    extra_config: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Returns the topic's committed records, in partition then offset order."""
    config = {
        "bootstrap.servers": bootstrap,
        # A group id is only a label here: partitions are assigned by hand and
        # nothing is committed, so the topic's real consumers are unaffected.
        "group.id": f"read-topic-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    }
    config.update(extra_config or {})
    consumer = Consumer(config)
    schemas = SchemaCache(registry)
    records: list[dict[str, Any]] = []
    try:
        # The service may not have created the topic yet when a test starts
        # reading: wait for it as long as the caller waits for records.
        appear_by = time.monotonic() + max(idle, 15.0)
        while True:
            metadata = consumer.list_topics(topic, timeout=15)
            meta = metadata.topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions:
                break
            if time.monotonic() >= appear_by:
                raise KafkaException(meta.error if meta else f"topic {topic} not found")
            time.sleep(0.5)
        consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
        )
        last_seen = time.monotonic()
        while expect is None or len(records) < expect:
            message = consumer.poll(0.2)
            if message is None:
                if time.monotonic() - last_seen >= idle:
                    break
                continue
            if message.error():
                raise KafkaException(message.error())
            last_seen = time.monotonic()
            _, timestamp = message.timestamp()
            records.append(
                {
                    "topic": message.topic(),
                    "partition": message.partition(),
                    "offset": message.offset(),
                    "key": decode(message.key(), schemas, key_format),
                    "headers": header_map(message.headers()),
                    "value": decode(message.value(), schemas, value_format),
                    "timestamp": timestamp,
                }
            )
    finally:
        consumer.close()
    records.sort(key=lambda r: (r["partition"], r["offset"]))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("topic", nargs="?")
    parser.add_argument("--topic", dest="topic_flag", help="the topic (or give it positionally)")
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP"),
        help="host:port (default: $KAFKA_BOOTSTRAP)",
    )
    parser.add_argument("--registry", help="schema registry URL for Avro values")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds without a new record")
    parser.add_argument("--expect", type=int, help="stop after this many records")
    formats = ["auto", "json", "avro", "text", "raw"]
    parser.add_argument("--value-format", choices=formats, default="auto")
    parser.add_argument("--key-format", choices=formats, default="text")
    parser.add_argument(
        "--strict", action="store_true", help="exit 3 when fewer than --expect records are found"
    )
    parser.add_argument(
        "-X",
        dest="config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka consumer setting, e.g. -X security.protocol=SASL_PLAINTEXT",
    )
    args = parser.parse_args(argv)
    topic = args.topic_flag or args.topic
    if not topic or (args.topic and args.topic_flag and args.topic != args.topic_flag):
        parser.error("give exactly one topic, positionally or with --topic")
    if not args.bootstrap:
        parser.error("--bootstrap or KAFKA_BOOTSTRAP is required")
    extra = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"-X expects KEY=VALUE, got {item!r}")
        extra[key] = value
    try:
        records = read_topic(
            args.bootstrap,
            topic,
            registry=args.registry,
            idle=args.idle,
            expect=args.expect,
            value_format=args.value_format,
            key_format=args.key_format,
            extra_config=extra,
        )
    except KafkaException as err:
        print(f"read_topic: {err}", file=sys.stderr)
        return 2
    for record in records:
        sys.stdout.write(json.dumps(record, default=to_json) + "\n")
    sys.stdout.flush()
    if args.expect is not None and len(records) < args.expect:
        print(
            f"read_topic: expected {args.expect} records in {topic}, found {len(records)}",
            file=sys.stderr,
        )
        return 3 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
