#!/usr/bin/env python3
"""A Python peer of insights-enricher, for issue 23's CPU comparison.

It does what the service does for users whose provider data is ready:
consumes `UserOnboarded` JSON records in a consumer group (read_committed),
calls FinBox (x-api-key, the salted body of docs/providers) and Credeau
(x-client-id, x-auth-token) for each user over pooled HTTP/1.1 connections,
many users at a time, checks that each answer is about the user asked for,
and publishes the three JSON outputs of docs/events.md (FinboxPredictors,
SmsExtraction, InsightsReady) keyed by user_id. Finished users are
committed in transactions (outputs and consumed offsets together), one
every `--linger-ms` or `--batch-users` users, in each partition's read
order.

It is written the way a Python team would write the service: asyncio,
httpx, confluent-kafka and the json module, without tricks in either
direction. Users that are not ready yet are polled again in process (the
service parks them in delay topics instead); the bench only gives it ready
users.

Settings are command-line options, each defaulting to an environment
variable (PEER_<OPTION>, e.g. PEER_BOOTSTRAP). Runs until SIGTERM or SIGINT,
then finishes the users in flight, commits and exits.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone

import httpx
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

# Compact JSON, UTF-8 kept as is (the service's JSON output is compact too).
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# The service's topics.max_message_bytes default: an SMS extraction larger
# than this is split into parts.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

FINBOX_KEYS = {
    "customer_id",
    "request_id",
    "status",
    "message",
    "date_requested",
    "date_processed",
    "data",
}


def now_ms():
    return time.time_ns() // 1_000_000


def log(*args):
    print(time.strftime("%H:%M:%S"), "peer:", *args, file=sys.stderr, flush=True)


def finbox_salt(customer_id, server_hash):
    """Base64(SHA-256(UPPER(hex(MD5(customer_id))) + server_hash))."""
    md5_hex = hashlib.md5(customer_id.encode()).hexdigest().upper()
    return base64.b64encode(hashlib.sha256((md5_hex + server_hash).encode()).digest()).decode()


def parse_finbox_time(s):
    """FinBox's `YYYY-MM-DDThh:mm:ss:mil`, read as UTC; None if unreadable."""
    if not isinstance(s, str):
        return None
    try:
        dt = datetime.strptime(s, "%Y-%m-%dT%H:%M:%S:%f").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return int(dt.timestamp() * 1000)


class BadInput(Exception):
    pass


def decode_input(value):
    """A UserOnboarded JSON record, checked as docs/events.md says."""
    if not value:
        raise BadInput("empty")
    try:
        doc = json.loads(value)
    except ValueError as e:
        raise BadInput(f"malformed_json: {e}") from None
    if not isinstance(doc, dict):
        raise BadInput("malformed_json: not an object")
    event_id, user_id = doc.get("event_id"), doc.get("user_id")
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= 128:
        raise BadInput("invalid_field: event_id")
    if not isinstance(user_id, str) or not 1 <= len(user_id) <= 260:
        raise BadInput("invalid_field: user_id")
    at = doc.get("onboarded_at")
    if isinstance(at, str):
        try:
            at = int(datetime.fromisoformat(at).timestamp() * 1000)
        except ValueError:
            raise BadInput("invalid_field: onboarded_at") from None
    if not isinstance(at, int) or isinstance(at, bool) or not 946684800000 <= at <= 253402300799999:
        raise BadInput("invalid_field: onboarded_at")
    return {
        "event_id": event_id,
        "user_id": user_id,
        "onboarded_at": at,
        "finbox_customer_id": doc.get("finbox_customer_id") or user_id,
        "credeau_user_id": doc.get("credeau_user_id") or user_id,
    }


def track():
    """One provider's part of the InsightsReady event."""
    return {
        "outcome": None,
        "polls": 0,
        "first_poll_at": None,
        "finished_at": None,
        "items": None,
        "error_kind": None,
        "http_status": None,
        "error_message": None,
        "provider_request_id": None,
        "request_id": None,
        "answered_id": None,
        "data_problem": None,
        "partial": False,
    }


def fail(t, kind, status, message):
    t.update(outcome="failed", error_kind=kind, http_status=status, error_message=message)


def error_message(resp):
    try:
        doc = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code}, not JSON"
    if isinstance(doc, dict):
        for key in ("message", "error", "detail"):
            if isinstance(doc.get(key), str):
                return doc[key]
        if doc.get("detail") is not None:
            return json.dumps(doc["detail"])
    return f"HTTP {resp.status_code}"


def predictor_value(v):
    if isinstance(v, (dict, list)):
        return dumps(v)
    return v


class Peer:
    def __init__(self, a):
        self.a = a
        # One client (a pool of connections) per provider, as they are two
        # hosts in production; each user holds at most one connection of
        # each at a time.
        def client(base_url, headers):
            return httpx.AsyncClient(
                base_url=base_url.rstrip("/"),
                headers=headers,
                limits=httpx.Limits(max_connections=a.concurrency, max_keepalive_connections=a.concurrency),
                timeout=httpx.Timeout(30.0, connect=5.0),
            )

        self.finbox_http = client(a.finbox_url, {"x-api-key": a.finbox_api_key})
        self.credeau_http = client(
            a.credeau_url,
            {"x-client-id": a.credeau_client_id, "x-auth-token": a.credeau_auth_token},
        )
        self.consumer = Consumer(
            {
                "bootstrap.servers": a.bootstrap,
                "group.id": a.group,
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
            }
        )
        self.producer = Producer(
            {
                "bootstrap.servers": a.bootstrap,
                "transactional.id": a.transactional_id,
                "enable.idempotence": True,
                "compression.type": "lz4",
                "linger.ms": 5,
                "message.max.bytes": MAX_MESSAGE_BYTES + 64 * 1024,
            }
        )
        self.stopping = False
        self.in_flight = 0
        self.slot_free = asyncio.Event()
        self.finished = asyncio.Event()
        # Per partition, the offsets read in order: [offset, outputs or None].
        self.pending = {}
        self.done_count = 0
        self.tasks = set()
        self.counts = {"users": 0, "bad_input": 0, "records": 0, "transactions": 0}

    # ---- providers

    async def finbox(self, user, t):
        cid = user["finbox_customer_id"]
        body = {"customer_id": cid, "version": self.a.finbox_version, "salt": finbox_salt(cid, self.a.finbox_server_hash)}
        retries = iter((2.0, 5.0))
        deadline = time.monotonic() + self.a.deadline_s
        while True:
            t["polls"] += 1
            if t["first_poll_at"] is None:
                t["first_poll_at"] = now_ms()
            try:
                resp = await self.finbox_http.post("/v2/risk/predictors", json=body)
            except httpx.HTTPError as e:
                resp, err = None, f"{type(e).__name__}: {e}"
            if resp is not None and resp.status_code in (200, 202):
                try:
                    doc = resp.json()
                except ValueError:
                    doc = None
                status = doc.get("status") if isinstance(doc, dict) else None
                if status == "complete":
                    t["finished_at"] = now_ms()
                    return self.finbox_complete(user, t, doc)
                if status == "no_data":
                    t.update(outcome="no_data", items=0, finished_at=now_ms(), request_id=doc.get("request_id"))
                    return None
                if status in ("in_progress", "not_found"):
                    if time.monotonic() + self.a.poll_s > deadline:
                        t.update(outcome="timed_out" if status == "in_progress" else "not_found", finished_at=now_ms())
                        return None
                    await asyncio.sleep(self.a.poll_s)
                    continue
                err = f"unexpected answer, status {status!r}"
            elif resp is not None:
                err = error_message(resp)
                if resp.status_code < 500 and resp.status_code != 429:
                    fail(t, "bad_request" if resp.status_code == 400 else "unauthorized", resp.status_code, err)
                    t["finished_at"] = now_ms()
                    return None
            wait = next(retries, None)
            if wait is None:
                fail(t, "server_error", resp.status_code if resp is not None else None, err)
                t["finished_at"] = now_ms()
                return None
            await asyncio.sleep(wait)

    def finbox_complete(self, user, t, doc):
        answered = doc.get("customer_id")
        if isinstance(answered, str) and answered.strip() and answered.strip() != user["finbox_customer_id"]:
            fail(t, "identity_mismatch", 200, "the answer is about another customer_id")
            t["answered_id"] = answered
            return None
        data = doc.get("data")
        predictors, problem = [], None
        if isinstance(data, list):
            skipped = 0
            for e in data:
                if isinstance(e, dict) and isinstance(e.get("name"), str):
                    extra = {k: dumps(v) for k, v in e.items() if k != "name" and k != "value"}
                    predictors.append({"name": e["name"], "value": predictor_value(e.get("value")), "extra": extra})
                else:
                    skipped += 1
            if skipped:
                problem = f"{skipped} of {len(data)} `data` entries are not objects with a string `name`"
        elif isinstance(data, dict):
            predictors = [{"name": k, "value": predictor_value(v), "extra": {}} for k, v in data.items()]
            problem = "`data` is an object, not a list"
        elif data is not None:
            problem = "`data` is not a list"
        rest = {k: v for k, v in doc.items() if k not in FINBOX_KEYS}
        version = rest.get("version")
        t.update(
            outcome="complete",
            items=len(predictors),
            request_id=doc.get("request_id"),
            data_problem=problem,
        )
        return {
            "event_id": user["event_id"],
            "user_id": user["user_id"],
            "finbox_customer_id": user["finbox_customer_id"],
            "onboarded_at": user["onboarded_at"],
            "fetched_at": t["finished_at"],
            "request_id": doc.get("request_id"),
            "date_requested": doc.get("date_requested"),
            "date_processed": doc.get("date_processed"),
            "date_processed_at": parse_finbox_time(doc.get("date_processed")),
            "predictors": predictors,
            "version": self.a.finbox_version,
            "message": doc.get("message"),
            "data_json": dumps(data) if data is not None else None,
            "data_problem": problem,
            "answered_customer_id": answered if isinstance(answered, str) else None,
            "answered_version": version if isinstance(version, int) else None,
            "response_json": dumps(rest) if rest else None,
        }

    async def credeau(self, user, t):
        uid = user["credeau_user_id"]
        body = {"user_id": uid, "client_id": self.a.credeau_client_id, "cnt_sms_threshold": self.a.cnt_sms_threshold}
        backoff = 1.0
        retries = 0
        deadline = time.monotonic() + self.a.deadline_s
        while True:
            t["polls"] += 1
            if t["first_poll_at"] is None:
                t["first_poll_at"] = now_ms()
            try:
                resp = await self.credeau_http.post("/api/fetch_extracted_data", json=body)
            except httpx.HTTPError as e:
                resp, err = None, f"{type(e).__name__}: {e}"
            if resp is not None and resp.status_code == 200:
                try:
                    doc = resp.json()
                except ValueError:
                    doc = None
                entries = doc.get("extracted_sms_data") if isinstance(doc, dict) else None
                if isinstance(entries, list) and entries:
                    t["finished_at"] = now_ms()
                    return self.credeau_complete(user, t, doc, entries)
                if isinstance(entries, list):
                    if time.monotonic() + self.a.poll_s > deadline:
                        t.update(outcome="timed_out", finished_at=now_ms())
                        return None
                    await asyncio.sleep(self.a.poll_s)
                    continue
                err = "no extracted_sms_data list in the answer"
            elif resp is not None:
                err = error_message(resp)
                if resp.status_code in (401, 403, 422):
                    kind = {401: "unauthorized", 403: "forbidden", 422: "bad_request"}[resp.status_code]
                    fail(t, kind, resp.status_code, err)
                    t["finished_at"] = now_ms()
                    return None
            retries += 1
            if retries > 3:
                fail(t, "server_error", resp.status_code if resp is not None else None, err)
                t["finished_at"] = now_ms()
                return None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    def credeau_complete(self, user, t, doc, entries):
        uid = user["credeau_user_id"]
        for e in entries:
            named = e.get("user_id") if isinstance(e, dict) else None
            if named is not None and named != "" and str(named).strip() != uid:
                fail(t, "identity_mismatch", 200, "an SMS entry is about another user_id")
                t["answered_id"] = str(named)
                return None
        rest = {k: v for k, v in doc.items() if k != "extracted_sms_data"}
        problem = None
        if rest.get("has_more") is True or rest.get("next_cursor"):
            problem = "Credeau holds more than it sent"
        t.update(outcome="complete", items=len(entries), data_problem=problem, partial=problem is not None)
        head = {
            "event_id": user["event_id"],
            "user_id": user["user_id"],
            "onboarded_at": user["onboarded_at"],
            "credeau_user_id": uid,
            "fetched_at": t["finished_at"],
            "part": 1,
            "parts": 1,
            "total_sms": len(entries),
            "entries": entries,
            "cnt_sms_threshold": self.a.cnt_sms_threshold,
            "data_problem": problem,
            "response_json": dumps(rest) if rest else None,
        }
        value = dumps(head).encode()
        if len(value) <= MAX_MESSAGE_BYTES:
            return [value]
        # Too large for one record: split the entries evenly into parts.
        parts = -(-len(value) // MAX_MESSAGE_BYTES) + 1
        size = -(-len(entries) // parts)
        chunks = [entries[i : i + size] for i in range(0, len(entries), size)]
        out = []
        for i, chunk in enumerate(chunks, 1):
            out.append(dumps({**head, "part": i, "parts": len(chunks), "entries": chunk}).encode())
        return out

    # ---- one user

    async def handle(self, msg):
        try:
            outputs = await self.user_outputs(msg)
        except Exception as e:  # a bug here must not stall the partition
            log(f"input {msg.partition()}/{msg.offset()}: {type(e).__name__}: {e}")
            outputs = []
        self.in_flight -= 1
        self.slot_free.set()
        self.pending[msg.partition()][msg.offset()] = outputs
        self.done_count += 1
        if self.done_count >= self.a.batch_users:
            self.finished.set()

    async def user_outputs(self, msg):
        try:
            user = decode_input(msg.value())
        except BadInput as e:
            self.counts["bad_input"] += 1
            log(f"input {msg.partition()}/{msg.offset()} dead-lettered: {e}")
            if self.a.dead_letter:
                return [(self.a.dead_letter, msg.key(), msg.value())]
            return []
        fb, cr = track(), track()
        predictors, sms = await asyncio.gather(self.finbox(user, fb), self.credeau(user, cr))
        key = user["user_id"].encode()
        outputs = []
        if predictors is not None:
            outputs.append((self.a.finbox_topic, key, dumps(predictors).encode()))
        for value in sms or ():
            outputs.append((self.a.sms_topic, key, value))
        ready = {
            "event_id": user["event_id"],
            "user_id": user["user_id"],
            "onboarded_at": user["onboarded_at"],
            "completed_at": now_ms(),
            "replay_of": None,
            "finbox": fb,
            "credeau": cr,
        }
        outputs.append((self.a.combined_topic, key, dumps(ready).encode()))
        self.counts["users"] += 1
        return outputs

    # ---- Kafka

    async def consume_loop(self):
        loop = asyncio.get_running_loop()
        self.consumer.subscribe([self.a.input])
        while not self.stopping:
            free = self.a.concurrency - self.in_flight
            if free <= 0:
                self.slot_free.clear()
                await self.slot_free.wait()
                continue
            msgs = await loop.run_in_executor(None, self.consumer.consume, min(free, 500), 0.1)
            for m in msgs:
                if m.error():
                    log(f"consumer: {m.error()}")
                    continue
                self.pending.setdefault(m.partition(), {})[m.offset()] = None
                self.in_flight += 1
                task = asyncio.create_task(self.handle(m))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    def take_committable(self):
        """Outputs and next offsets of the users done in read order."""
        outputs, offsets = [], []
        for p, by_offset in self.pending.items():
            nxt = None
            # Dicts keep insertion (read) order.
            while by_offset:
                o = next(iter(by_offset))
                out = by_offset[o]
                if out is None:
                    break
                del by_offset[o]
                outputs.extend(out)
                nxt = o + 1
                self.done_count -= 1
            if nxt is not None:
                offsets.append(TopicPartition(self.a.input, p, nxt))
        return outputs, offsets

    def produce(self, topic, key, value):
        while True:
            try:
                self.producer.produce(topic, value=value, key=key)
                return
            except BufferError:
                self.producer.poll(0.05)

    async def commit_loop(self):
        linger = self.a.linger_ms / 1000
        while True:
            try:
                await asyncio.wait_for(self.finished.wait(), linger)
            except asyncio.TimeoutError:
                pass
            self.finished.clear()
            outputs, offsets = self.take_committable()
            if offsets:
                self.producer.begin_transaction()
                for topic, key, value in outputs:
                    self.produce(topic, key, value)
                self.counts["records"] += len(outputs)
                await asyncio.to_thread(
                    self.producer.send_offsets_to_transaction,
                    offsets,
                    self.consumer.consumer_group_metadata(),
                    30,
                )
                await asyncio.to_thread(self.producer.commit_transaction, 30)
                self.counts["transactions"] += 1
            elif self.stopping and self.in_flight == 0:
                return

    async def report_loop(self):
        while True:
            await asyncio.sleep(10)
            log(f"in flight {self.in_flight}, counts {self.counts}")

    async def run(self):
        for attempt in range(10):
            try:
                await asyncio.to_thread(self.producer.init_transactions, 30)
                break
            except KafkaException as e:
                if attempt == 9:
                    raise
                log(f"init_transactions failed ({e}), retrying")
                await asyncio.sleep(2)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        log(f"started: input {self.a.input}, group {self.a.group}, concurrency {self.a.concurrency}")
        reporter = asyncio.create_task(self.report_loop())
        committer = asyncio.create_task(self.commit_loop())
        await self.consume_loop()
        await committer
        reporter.cancel()
        await self.finbox_http.aclose()
        await self.credeau_http.aclose()
        self.producer.flush(30)
        self.consumer.close()
        log(f"stopped: counts {self.counts}")

    def stop(self):
        log("stopping")
        self.stopping = True
        self.slot_free.set()


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def opt(name, default=None, type=str, help=None):
        env = "PEER_" + name.upper().replace("-", "_")
        value = os.environ.get(env, default)
        ap.add_argument(
            "--" + name,
            default=type(value) if value is not None else None,
            type=type,
            required=value is None,
            help=f"{help or name} (env {env})",
        )

    opt("bootstrap", help="Kafka bootstrap servers")
    opt("input", help="input topic (UserOnboarded)")
    opt("group", help="consumer group id")
    opt("transactional-id", help="the producer's transactional.id")
    opt("finbox-topic", help="FinboxPredictors topic")
    opt("sms-topic", help="SmsExtraction topic")
    opt("combined-topic", help="InsightsReady topic")
    opt("dead-letter", default="", help="dead letter topic ('' = none)")
    opt("finbox-url", help="FinBox base URL")
    opt("credeau-url", help="Credeau base URL")
    opt("finbox-api-key")
    opt("finbox-server-hash")
    opt("finbox-version", default="1", type=int)
    opt("credeau-client-id")
    opt("credeau-auth-token")
    opt("cnt-sms-threshold", default="5000", type=int)
    opt("concurrency", default="64", type=int, help="users in flight")
    opt("batch-users", default="400", type=int, help="finished users that end a transaction early")
    opt("linger-ms", default="100", type=int, help="how often finished users are committed")
    opt("poll-s", default="10", type=float, help="wait before asking a provider again")
    opt("deadline-s", default="21600", type=float, help="how long to keep asking")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    peer = Peer(a)
    asyncio.run(peer.run())


if __name__ == "__main__":
    main()
