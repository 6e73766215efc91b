"""A small Confluent-compatible schema registry for tests.

It holds Avro schemas in memory and speaks the subset of the Confluent
Schema Registry REST API that Confluent clients and insights-enricher use:

    POST /subjects/{subject}/versions          register (same schema -> same id)
    POST /subjects/{subject}                   look a schema up in a subject
    GET  /schemas/ids/{id}                     schema by global id
    GET  /subjects                             subject names
    GET  /subjects/{subject}/versions          version numbers
    GET  /subjects/{subject}/versions/{v}      one version, or "latest"
    POST /compatibility/subjects/{subject}/versions/latest
    GET|PUT /config[/{subject}]                compatibility level

Compatibility is checked for real: under BACKWARD (the default, as in
Confluent) a new schema must be able to read data written with the latest
one. The check parses both schemas with fastavro, writes sample records
generated from the old schema and reads them back with the new one as reader
schema; any schema resolution error makes the pair incompatible. Sampling is
not a proof, but a missing default, a changed type or a removed union branch
is caught on the first record.

Run: python registry.py --port 0 --port-file FILE
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import fastavro
from fastavro.utils import generate_many

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
LEVELS = {
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
}
COMPAT_SAMPLES = 32


class RegistryError(Exception):
    """An error answered to the client in Confluent's error shape."""

    def __init__(self, status: int, error_code: int, message: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def canonical(schema_text: str) -> str:
    """The identity of a schema: its JSON re-serialised without whitespace.

    Object keys are sorted, array order (field order) is kept, so the same
    schema written with different spacing or key order gets the same id.
    """
    return json.dumps(json.loads(schema_text), sort_keys=True, separators=(",", ":"))


def parse_avro(schema_text: str) -> Any:
    try:
        return fastavro.parse_schema(json.loads(schema_text))
    except Exception as err:  # noqa: BLE001 - any parse failure means an invalid schema
        raise RegistryError(422, 42201, f"Invalid schema: {err}") from err


def can_read(reader_text: str, writer_text: str) -> tuple[bool, str]:
    """Whether data written with `writer_text` decodes with `reader_text`."""
    writer = parse_avro(writer_text)
    reader = parse_avro(reader_text)
    for record in generate_many(writer, COMPAT_SAMPLES):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, writer, reader)
        except (fastavro.read.SchemaResolutionError, ValueError, KeyError, TypeError) as err:
            return False, str(err)
    return True, ""


def compatible(level: str, new_text: str, history: list[str]) -> tuple[bool, list[str]]:
    """Checks `new_text` against the subject's schemas under `level`."""
    if level == "NONE" or not history:
        return True, []
    against = history if level.endswith("_TRANSITIVE") else history[-1:]
    messages = []
    for old in against:
        if level.startswith(("BACKWARD", "FULL")):
            ok, why = can_read(new_text, old)
            if not ok:
                messages.append(f"new schema cannot read data written with an old one: {why}")
        if level.startswith(("FORWARD", "FULL")):
            ok, why = can_read(old, new_text)
            if not ok:
                messages.append(f"an old schema cannot read data written with the new one: {why}")
    return not messages, messages


class Store:
    """All registry state, behind one lock (requests arrive on many threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: dict[str, int] = {}  # canonical schema -> global id
        self.texts: dict[int, str] = {}  # global id -> schema as first registered
        self.subjects: dict[str, list[int]] = {}  # subject -> ids, version i+1 at i
        self.levels: dict[str, str] = {}  # subject -> level; "" is the global one

    def level(self, subject: str) -> str:
        return self.levels.get(subject) or self.levels.get("", "BACKWARD")

    def register(self, subject: str, schema_text: str) -> int:
        parse_avro(schema_text)
        key = canonical(schema_text)
        with self.lock:
            versions = self.subjects.get(subject, [])
            known = self.ids.get(key)
            if known is not None and known in versions:
                return known
            history = [self.texts[i] for i in versions]
            ok, messages = compatible(self.level(subject), schema_text, history)
            if not ok:
                raise RegistryError(
                    409,
                    409,
                    "Schema being registered is incompatible with an earlier schema for subject "
                    f'"{subject}", details: {messages}',
                )
            if known is None:
                known = len(self.texts) + 1
                self.ids[key] = known
                self.texts[known] = schema_text
            self.subjects.setdefault(subject, []).append(known)
            return known

    def versions(self, subject: str) -> list[int]:
        with self.lock:
            if subject not in self.subjects:
                raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
            return list(range(1, len(self.subjects[subject]) + 1))

    def version(self, subject: str, version: str) -> dict[str, Any]:
        with self.lock:
            if subject not in self.subjects:
                raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
            ids = self.subjects[subject]
            if version in ("latest", "-1"):
                number = len(ids)
            elif re.fullmatch(r"[0-9]+", version) and 1 <= int(version) <= len(ids):
                number = int(version)
            else:
                raise RegistryError(404, 40402, f"Version {version} not found.")
            schema_id = ids[number - 1]
            return {
                "subject": subject,
                "version": number,
                "id": schema_id,
                "schema": self.texts[schema_id],
            }

    def lookup(self, subject: str, schema_text: str) -> dict[str, Any]:
        parse_avro(schema_text)
        key = canonical(schema_text)
        with self.lock:
            if subject not in self.subjects:
                raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
            schema_id = self.ids.get(key)
            ids = self.subjects[subject]
            if schema_id is None or schema_id not in ids:
                raise RegistryError(404, 40403, "Schema not found")
            return {
                "subject": subject,
                "version": ids.index(schema_id) + 1,
                "id": schema_id,
                "schema": self.texts[schema_id],
            }

    def by_id(self, schema_id: int) -> str:
        with self.lock:
            if schema_id not in self.texts:
                raise RegistryError(404, 40403, "Schema not found")
            return self.texts[schema_id]

    def check(self, subject: str, version: str, schema_text: str) -> tuple[bool, list[str]]:
        parse_avro(schema_text)
        with self.lock:
            if subject not in self.subjects:
                # Confluent answers compatible when there is nothing to break.
                return True, []
            history = [self.texts[i] for i in self.subjects[subject]]
            level = self.level(subject)
        if version != "latest":
            current = self.version(subject, version)["schema"]
            history = [current]
        return compatible(level, schema_text, history)


class Handler(BaseHTTPRequestHandler):
    server: "RegistryServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        if self.server.verbose:
            super().log_message(format, *args)

    def reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            parsed = json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            raise RegistryError(400, 400, f"Unrecognized JSON: {err}") from err
        if not isinstance(parsed, dict):
            raise RegistryError(422, 422, "Request body must be a JSON object")
        return parsed

    def schema_from(self, body: dict[str, Any]) -> str:
        schema = body.get("schema")
        if not isinstance(schema, str):
            raise RegistryError(422, 42201, "Invalid schema: 'schema' must be a string")
        if body.get("schemaType", "AVRO") != "AVRO":
            raise RegistryError(422, 42201, "Only AVRO schemas are supported")
        if body.get("references"):
            raise RegistryError(422, 42201, "Schema references are not supported")
        return schema

    def route(self, method: str) -> None:
        store = self.server.store
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/") if p]
        match (method, parts):
            case ("GET", ["subjects"]):
                with store.lock:
                    self.reply(200, sorted(store.subjects))
            case ("GET", ["subjects", subject, "versions"]):
                self.reply(200, store.versions(subject))
            case ("GET", ["subjects", subject, "versions", version]):
                self.reply(200, store.version(subject, version))
            case ("GET", ["subjects", subject, "versions", version, "schema"]):
                self.reply(200, json.loads(store.version(subject, version)["schema"]))
            case ("POST", ["subjects", subject, "versions"]):
                self.reply(200, {"id": store.register(subject, self.schema_from(self.body()))})
            case ("POST", ["subjects", subject]):
                self.reply(200, store.lookup(subject, self.schema_from(self.body())))
            case ("GET", ["schemas", "ids", schema_id]) if schema_id.isdigit():
                self.reply(200, {"schema": store.by_id(int(schema_id))})
            case ("POST", ["compatibility", "subjects", subject, "versions", version]):
                ok, messages = store.check(subject, version, self.schema_from(self.body()))
                answer: dict[str, Any] = {"is_compatible": ok}
                if "verbose=true" in (urlsplit(self.path).query or ""):
                    answer["messages"] = messages
                self.reply(200, answer)
            case ("GET", ["config", *rest]) if len(rest) <= 1:
                subject = rest[0] if rest else ""
                self.reply(200, {"compatibilityLevel": store.level(subject)})
            case ("PUT", ["config", *rest]) if len(rest) <= 1:
                level = self.body().get("compatibility")
                if level not in LEVELS:
                    raise RegistryError(422, 42203, f"Invalid compatibility level: {level}")
                with store.lock:
                    store.levels[rest[0] if rest else ""] = level
                self.reply(200, {"compatibility": level})
            case _:
                raise RegistryError(404, 404, f"HTTP 404 Not Found: {method} {self.path}")

    def handle_method(self, method: str) -> None:
        try:
            self.route(method)
        except RegistryError as err:
            self.reply(err.status, {"error_code": err.error_code, "message": err.message})
        except Exception as err:  # noqa: BLE001 - a test server answers 500, never dies
            self.reply(500, {"error_code": 50001, "message": f"Error in the backend: {err}"})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.handle_method("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.handle_method("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.handle_method("PUT")


class RegistryServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0, host: str = "127.0.0.1", verbose: bool = False):
        super().__init__((host, port), Handler)
        self.store = Store()
        self.verbose = verbose

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def start_in_thread(port: int = 0) -> RegistryServer:
    """Starts a registry on a background thread; call .shutdown() to stop it."""
    server = RegistryServer(port)
    threading.Thread(target=server.serve_forever, name="schema-registry", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    server = RegistryServer(args.port, args.host, args.verbose)
    port = server.server_address[1]
    if args.port_file:
        # Written atomically so a waiting reader never sees a partial number.
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"schema registry listening on {server.url}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
