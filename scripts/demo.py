"""Drives the local demo: sends sample onboarded users with a mix of
scenarios, shows progress from the service's /metrics while they flow, and
prints what came out on each topic (read_committed, as a decision engine
would read it).

Run by scripts/demo.sh, which starts the broker, the simulator and the
service first.
"""

import argparse
import collections
import json
import sys
import time
import urllib.request
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

# prefix -> how many users; the prefixes are scenarios of
# examples/scenarios/mixed.json (LEGEND says what each one does).
MIX = {
    "fast-": 6,
    "slow-": 3,  # no prefix match: the scenario file's default
    "nodata-": 2,
    "sync-": 2,
    "ghost-": 2,
    "never-": 2,
    "storm-": 3,
    "throttled-": 3,
    "flaky-": 3,
}

LEGEND = (
    "scenarios: fast- data at once | slow- data after 20-30 s | "
    "nodata- FinBox no_data, no SMS | sync- FinBox not found for 45 s, then data | "
    "ghost- FinBox never finds the user | never- never ready (deadlines) | "
    "storm- 5xx errors | throttled- 429s | flaky- dropped connections, broken bodies | "
    "demo-user-1 5000 SMS (multi-megabyte)"
)

COLUMNS = (
    "columns: input = onboarded events read; re-reads = users read back from the "
    "delay topics for their next poll; finbox/credeau = HTTP calls to each provider; "
    "published = events out per kind; in flight = users sent but not yet combined"
)


def shorten(text, width):
    """`text` cut at a word boundary to at most `width` characters."""
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "…"


def metric_sums(text):
    sums = collections.Counter()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        name = name_labels.split("{", 1)[0]
        sums[name] += v
        if "{" in name_labels:
            for part in name_labels.split("{", 1)[1].rstrip("}").split(","):
                label, _, val = part.partition("=")
                if label in ("topic", "provider"):
                    sums[f"{name}[{val.strip(chr(34))}]"] += v
    return sums


def scrape(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return metric_sums(r.read().decode())
    except OSError:
        return None


def send(bootstrap, topic):
    p = Producer({"bootstrap.servers": bootstrap})
    now = int(time.time() * 1000)
    users = []
    run = uuid.uuid4().hex[:6]
    for prefix, n in MIX.items():
        for i in range(n):
            users.append(f"{prefix}{run}-{i}")
    users.append("demo-user-1")  # 5000 SMS: a multi-megabyte event
    for u in users:
        event = {"event_id": f"ev-{u}-{run}", "user_id": u, "onboarded_at": now}
        p.produce(topic, key=u, value=json.dumps(event))
    # Two poison records, to show the dead-letter topic at work.
    p.produce(topic, key="broken", value=b'{"event_id": "x", "user_id": ')
    p.produce(topic, key="too-long", value=json.dumps(
        {"event_id": "y", "user_id": "u" * 65, "onboarded_at": now}))
    p.flush(30)
    return users


def read_all(bootstrap, topic):
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"demo-reader-{uuid.uuid4().hex[:8]}",
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    md = c.list_topics(topic, timeout=10)
    parts = [TopicPartition(topic, p, 0) for p in md.topics[topic].partitions]
    c.assign(parts)
    out, idle = [], 0
    while idle < 4:
        m = c.poll(0.5)
        if m is None:
            idle += 1
            continue
        if m.error():
            continue
        idle = 0
        out.append(m)
    c.close()
    return out


def json_or_avro(registry):
    """How to read an output value: JSON, or with a registry Avro in the
    Confluent wire format, read as a decision engine would (confluent-kafka's
    AvroDeserializer and SchemaRegistryClient)."""
    if not registry:
        return lambda value, topic: json.loads(value)
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry}))
    return lambda value, topic: deserializer(
        value, SerializationContext(topic, MessageField.VALUE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--input", default="users.onboarded")
    ap.add_argument("--combined", default="insights.ready")
    ap.add_argument("--finbox", default="insights.finbox.predictors")
    ap.add_argument("--sms", default="insights.credeau.sms")
    ap.add_argument("--dlq", default="insights-enricher.dlq")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--registry", help="schema registry URL: outputs are Avro (demo.sh --avro)")
    a = ap.parse_args()
    decode = json_or_avro(a.registry)

    users = send(a.bootstrap, a.input)
    print(f"sent {len(users)} onboarded users and 2 poison records to {a.input}")
    print(LEGEND)
    print(COLUMNS, flush=True)
    start = time.time()
    done = 0
    while time.time() - start < a.timeout:
        m = scrape(a.metrics)
        if m is not None:
            done = int(m.get("insights_published_total[insights_ready]", 0))
            print(
                f"[{time.time() - start:4.0f}s]"
                f" input {int(m.get('insights_events_consumed_total[input]', 0)):3d}"
                f" | re-reads {int(m.get('insights_events_consumed_total[delay]', 0)):4d}"
                f" | calls finbox {int(m.get('insights_provider_requests_total[finbox]', 0)):4d}"
                f" credeau {int(m.get('insights_provider_requests_total[credeau]', 0)):4d}"
                f" | published predictors {int(m.get('insights_published_total[finbox_predictors]', 0)):2d}"
                f" sms {int(m.get('insights_published_total[sms_extraction]', 0)):2d}"
                f" combined {done:2d}/{len(users)}"
                f" | in flight {max(len(users) - done, 0):2d}"
                f" | dead letters {int(m.get('insights_dead_letters_total', 0)):2d}",
                flush=True,
            )
        else:
            print(f"[{time.time() - start:4.0f}s] (no answer from {a.metrics})", flush=True)
        if done >= len(users):
            break
        time.sleep(3)

    print("\nwhat came out (read_committed):")
    for name, topic in [("combined", a.combined), ("finbox predictors", a.finbox),
                        ("sms extraction", a.sms), ("dead letters", a.dlq)]:
        recs = read_all(a.bootstrap, topic)
        size = sum(len(r.value() or b"") for r in recs)
        print(f"  {topic:<32} {len(recs):4d} records  {size / 1024:9.1f} KiB  ({name})")
        if topic == a.combined:
            outcomes = collections.Counter()
            for r in recs:
                v = decode(r.value(), topic)
                prefix = v["user_id"].split("-")[0]
                outcomes[(prefix, v["finbox"]["outcome"], v["credeau"]["outcome"])] += 1
            for (prefix, fo, co), n in sorted(outcomes.items()):
                print(f"      {prefix + '-*':<14} x{n:<3} finbox {fo:<10} credeau {co}")
        if topic == a.dlq:
            for r in recs:
                h = dict((k, (v or b"").decode()) for k, v in (r.headers() or []))
                msg = shorten(h.get("dlq.error.message", ""), 90)
                print(f"      {h.get('dlq.stage')}: {h.get('dlq.error.class')} - {msg}")
    if done < len(users):
        print(f"\nonly {done} of {len(users)} users finished within {a.timeout:.0f}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
