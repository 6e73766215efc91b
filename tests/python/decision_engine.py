"""A decision engine written in another language than the service: reads
every output topic of insights-enricher with confluent-kafka's own
AvroDeserializer (confluent_kafka.schema_registry) against a
Confluent-compatible registry, read_committed, and checks each record field
by field against the Avro schemas in schemas/.

A record passes when it has exactly the fields of its schema and every value
has the Python type the schema's Avro type decodes to (timestamp-millis as an
aware datetime, enum as one of its symbols, a union as one of its branches,
nested records, arrays and maps recursively). Output headers are checked too.

Prints one JSON object: counts per topic, the errors found, and which union
branches were seen at each field path (so a caller can tell that a check was
not vacuous); exit status 0 when there were no errors and every topic
reached its minimum count, 1 otherwise, 2 on a usage or connection error.

The combined topic is read first: the service commits a user's provider
records with or before its combined event, so once the combined events are
visible, each provider topic is read to its end.

Run: python decision_engine.py --bootstrap HOST:PORT --registry URL
        --finbox-topic T --sms-topic T --combined-topic T
        --min-finbox N --min-sms N --min-combined N [--schemas DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

REPO = Path(__file__).resolve().parents[2]
INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)


def _type_name(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return "union"
    return schema.get("logicalType") or schema["type"]


class SchemaChecker:
    """Checks decoded Avro values against a schema (as parsed JSON)."""

    def __init__(self) -> None:
        self.named: dict[str, Any] = {}
        # field path -> union branch type names seen there (and "nonempty
        # map" for maps that held something)
        self.branches: dict[str, set[str]] = defaultdict(set)

    def _register(self, schema: Any, namespace: str | None) -> None:
        if isinstance(schema, list):
            for s in schema:
                self._register(s, namespace)
        elif isinstance(schema, dict):
            t = schema.get("type")
            if t in ("record", "enum", "fixed"):
                ns = schema.get("namespace", namespace)
                name = schema["name"]
                full = name if "." in name or not ns else f"{ns}.{name}"
                self.named[full] = schema
                self.named[name] = schema
                for f in schema.get("fields", []):
                    self._register(f["type"], ns)
            elif t == "array":
                self._register(schema["items"], namespace)
            elif t == "map":
                self._register(schema["values"], namespace)
            elif isinstance(t, (dict, list)):
                self._register(t, namespace)

    def check(self, value: Any, schema: Any, path: str = "$") -> list[str]:
        """Returns every mismatch between value and schema."""
        self._register(schema, None)
        return self._check(value, schema, path)

    def _check(self, value: Any, schema: Any, path: str) -> list[str]:
        if isinstance(schema, str) and schema in self.named:
            schema = self.named[schema]
        if isinstance(schema, list):
            for branch in schema:
                if not self._check(value, branch, path):
                    self.branches[path].add(_type_name(branch))
                    return []
            return [f"{path}: {value!r} matches no branch of {[_type_name(b) for b in schema]}"]
        if isinstance(schema, dict) and isinstance(schema.get("type"), (dict, list)):
            return self._check(value, schema["type"], path)
        kind = schema if isinstance(schema, str) else schema["type"]
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        if logical == "timestamp-millis":
            if not isinstance(value, datetime.datetime) or value.tzinfo is None:
                return [f"{path}: expected an aware datetime (timestamp-millis), got {value!r}"]
            return []
        if kind == "null":
            return [] if value is None else [f"{path}: expected null, got {value!r}"]
        if kind == "boolean":
            return [] if isinstance(value, bool) else [f"{path}: expected boolean, got {value!r}"]
        if kind in ("int", "long"):
            lo, hi = INT_RANGE if kind == "int" else LONG_RANGE
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                return [f"{path}: expected {kind}, got {value!r}"]
            return []
        if kind in ("float", "double"):
            return [] if isinstance(value, float) else [f"{path}: expected {kind}, got {value!r}"]
        if kind == "string":
            return [] if isinstance(value, str) else [f"{path}: expected string, got {value!r}"]
        if kind == "bytes":
            return [] if isinstance(value, bytes) else [f"{path}: expected bytes, got {value!r}"]
        if kind == "enum":
            if value not in schema["symbols"]:
                return [f"{path}: {value!r} is not one of {schema['symbols']}"]
            return []
        if kind == "array":
            if not isinstance(value, list):
                return [f"{path}: expected array, got {type(value).__name__}"]
            errors: list[str] = []
            for i, item in enumerate(value):
                errors += self._check(item, schema["items"], f"{path}[]")
                if len(errors) > 20:
                    break
            return errors
        if kind == "map":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                return [f"{path}: expected map with string keys, got {value!r}"]
            if value:
                self.branches[path].add("nonempty map")
            errors = []
            for v in value.values():
                errors += self._check(v, schema["values"], f"{path}{{}}")
            return errors
        if kind == "record":
            if not isinstance(value, dict):
                return [f"{path}: expected record {schema['name']}, got {type(value).__name__}"]
            want = [f["name"] for f in schema["fields"]]
            errors = []
            missing = [f for f in want if f not in value]
            extra = [k for k in value if k not in want]
            if missing:
                errors.append(f"{path}: missing fields {missing}")
            if extra:
                errors.append(f"{path}: fields not in {schema['name']}: {extra}")
            for f in schema["fields"]:
                if f["name"] in value:
                    errors += self._check(value[f["name"]], f["type"], f"{path}.{f['name']}")
            return errors
        return [f"{path}: unsupported schema type {kind!r}"]


def load_schema(schemas: Path, name: str) -> Any:
    return json.loads((schemas / f"{name}.avsc").read_text())


def header_map(msg: Any) -> dict[str, str]:
    return {k: (v.decode("utf-8", "replace") if v is not None else "") for k, v in (msg.headers() or [])}


def read_avro_topic(
    bootstrap: str, deserializer: AvroDeserializer, topic: str, minimum: int, timeout: float
) -> list[tuple[Any, Any, dict[str, str]]]:
    """(key, value, headers) of every committed record, decoded: waits for at
    least `minimum`, then reads on until nothing new came for 2 s."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"decision-engine-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=15)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            raise KafkaException(f"topic {topic} not found")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out = []
        deadline = time.monotonic() + timeout
        idle_until = None
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if len(out) >= minimum:
                    # Linger a little so an unexpected extra record shows up.
                    idle_until = idle_until or time.monotonic() + 2.0
                    if time.monotonic() > idle_until:
                        break
                continue
            if msg.error():
                raise KafkaException(msg.error())
            ctx = SerializationContext(topic, MessageField.VALUE, msg.headers())
            value = deserializer(msg.value(), ctx)
            key = msg.key().decode("utf-8") if msg.key() is not None else None
            out.append((key, value, header_map(msg)))
            idle_until = None
        return out
    finally:
        consumer.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--finbox-topic", required=True)
    ap.add_argument("--sms-topic", required=True)
    ap.add_argument("--combined-topic", required=True)
    ap.add_argument("--min-finbox", type=int, required=True)
    ap.add_argument("--min-sms", type=int, required=True)
    ap.add_argument("--min-combined", type=int, required=True)
    ap.add_argument("--schemas", type=Path, default=REPO / "schemas")
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args(argv)

    registry = SchemaRegistryClient({"url": args.registry})
    # No reader schema: the writer schema from the registry decodes the
    # value (as a generic record), which is what a schema-less engine sees.
    deserializer = AvroDeserializer(registry)
    checker = SchemaChecker()
    plan = [
        ("combined", args.combined_topic, "insights_ready", args.min_combined),
        ("finbox", args.finbox_topic, "finbox_predictors", args.min_finbox),
        ("sms", args.sms_topic, "sms_extraction", args.min_sms),
    ]
    report: dict[str, Any] = {"counts": {}, "errors": [], "outcomes": [], "sms_parts": [], "finbox_users": []}
    try:
        for label, topic, schema_name, minimum in plan:
            schema = load_schema(args.schemas, schema_name)
            records = read_avro_topic(args.bootstrap, deserializer, topic, minimum, args.timeout)
            report["counts"][label] = len(records)
            if len(records) < minimum:
                report["errors"].append(f"{topic}: {len(records)} records, expected at least {minimum}")
            for key, value, headers in records:
                where = f"{label}[{key}]"
                report["errors"] += [f"{where} {e}" for e in checker.check(value, schema)]
                if not isinstance(value, dict):
                    continue
                if key != value.get("user_id"):
                    report["errors"].append(f"{where}: key is not the user_id")
                if headers.get("insights.event_type") != schema_name:
                    report["errors"].append(f"{where}: insights.event_type = {headers.get('insights.event_type')!r}")
                if headers.get("insights.event_id") != value.get("event_id"):
                    report["errors"].append(f"{where}: insights.event_id header differs from event_id")
                if label == "sms":
                    if headers.get("insights.part") != str(value.get("part")) or headers.get(
                        "insights.parts"
                    ) != str(value.get("parts")):
                        report["errors"].append(f"{where}: part headers differ from the payload")
                    report["sms_parts"].append([value.get("user_id"), value.get("part"), value.get("parts")])
                if label == "finbox":
                    report["finbox_users"].append(value.get("user_id"))
                if label == "combined":
                    report["outcomes"].append(
                        [value.get("user_id"), value["finbox"].get("outcome"), value["credeau"].get("outcome")]
                    )
    except KafkaException as err:
        print(f"kafka: {err}", file=sys.stderr)
        return 2
    report["branches"] = {path: sorted(kinds) for path, kinds in sorted(checker.branches.items())}
    print(json.dumps(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
