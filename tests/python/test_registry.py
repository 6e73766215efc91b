"""The schema registry stand-in, over HTTP and through the Confluent client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from registry import CONTENT_TYPE, RegistryServer

V1 = {
    "type": "record",
    "name": "Event",
    "fields": [{"name": "user_id", "type": "string"}],
}
V2_WITH_DEFAULT = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "source", "type": "string", "default": "finbox"},
    ],
}
V2_WITHOUT_DEFAULT = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "source", "type": "string"},
    ],
}
V2_CHANGED_TYPE = {
    "type": "record",
    "name": "Event",
    "fields": [{"name": "user_id", "type": "long"}],
}


def post(registry: RegistryServer, path: str, schema: Any) -> requests.Response:
    body = {"schema": schema if isinstance(schema, str) else json.dumps(schema)}
    return requests.post(
        f"{registry.url}{path}",
        data=json.dumps(body),
        headers={"Content-Type": CONTENT_TYPE},
        timeout=10,
    )


def get(registry: RegistryServer, path: str) -> requests.Response:
    return requests.get(f"{registry.url}{path}", timeout=10)


def test_the_same_schema_gets_the_same_id_across_subjects_and_spellings(
    registry: RegistryServer,
) -> None:
    first = post(registry, "/subjects/a-value/versions", V1)
    assert first.status_code == 200
    assert first.headers["Content-Type"] == CONTENT_TYPE
    schema_id = first.json()["id"]

    respelled = json.dumps(V1, indent=4, sort_keys=True)
    assert post(registry, "/subjects/a-value/versions", respelled).json() == {"id": schema_id}
    assert post(registry, "/subjects/b-value/versions", V1).json() == {"id": schema_id}
    assert get(registry, "/subjects/a-value/versions").json() == [1]
    assert get(registry, "/subjects").json() == ["a-value", "b-value"]
    assert json.loads(get(registry, f"/schemas/ids/{schema_id}").json()["schema"]) == V1


def test_versions_latest_and_lookup_describe_the_subject(registry: RegistryServer) -> None:
    id1 = post(registry, "/subjects/s/versions", V1).json()["id"]
    id2 = post(registry, "/subjects/s/versions", V2_WITH_DEFAULT).json()["id"]
    assert id1 != id2

    assert get(registry, "/subjects/s/versions").json() == [1, 2]
    latest = get(registry, "/subjects/s/versions/latest").json()
    assert (latest["subject"], latest["version"], latest["id"]) == ("s", 2, id2)
    assert get(registry, "/subjects/s/versions/1").json()["id"] == id1

    found = post(registry, "/subjects/s", V1).json()
    assert (found["version"], found["id"]) == (1, id1)
    missing = post(registry, "/subjects/s", V2_CHANGED_TYPE)
    assert (missing.status_code, missing.json()["error_code"]) == (404, 40403)


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [(V2_WITH_DEFAULT, True), (V2_WITHOUT_DEFAULT, False), (V2_CHANGED_TYPE, False)],
    ids=["added-field-with-default", "added-field-without-default", "changed-type"],
)
def test_backward_compatibility_is_checked_against_the_latest_schema(
    registry: RegistryServer, candidate: dict[str, Any], expected: bool
) -> None:
    post(registry, "/subjects/c/versions", V1).raise_for_status()

    answer = post(registry, "/compatibility/subjects/c/versions/latest", candidate)
    assert answer.json()["is_compatible"] is expected

    registered = post(registry, "/subjects/c/versions", candidate)
    if expected:
        assert registered.status_code == 200
        assert get(registry, "/subjects/c/versions").json() == [1, 2]
    else:
        assert (registered.status_code, registered.json()["error_code"]) == (409, 409)
        assert get(registry, "/subjects/c/versions").json() == [1]


def test_compatibility_level_none_accepts_any_change(registry: RegistryServer) -> None:
    post(registry, "/subjects/n/versions", V1).raise_for_status()
    put = requests.put(f"{registry.url}/config/n", json={"compatibility": "NONE"}, timeout=10)
    assert put.json() == {"compatibility": "NONE"}
    assert get(registry, "/config/n").json() == {"compatibilityLevel": "NONE"}
    assert get(registry, "/config").json() == {"compatibilityLevel": "BACKWARD"}
    assert post(registry, "/subjects/n/versions", V2_CHANGED_TYPE).status_code == 200


def test_errors_use_confluent_codes(registry: RegistryServer) -> None:
    unknown_type = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "nope"}]}
    invalid = post(registry, "/subjects/x/versions", unknown_type)
    assert (invalid.status_code, invalid.json()["error_code"]) == (422, 42201)
    not_json = post(registry, "/subjects/x/versions", "{not json")
    assert not_json.json()["error_code"] == 42201
    assert get(registry, "/subjects/nope/versions").json()["error_code"] == 40401
    post(registry, "/subjects/x/versions", V1).raise_for_status()
    assert get(registry, "/subjects/x/versions/7").json()["error_code"] == 40402
    assert get(registry, "/schemas/ids/999").json()["error_code"] == 40403


def test_the_confluent_client_registers_and_fetches_schemas(registry: RegistryServer) -> None:
    client = SchemaRegistryClient({"url": registry.url})
    schema_id = client.register_schema("cl-value", Schema(json.dumps(V1), "AVRO"))
    assert json.loads(client.get_schema(schema_id).schema_str) == V1
    assert client.get_latest_version("cl-value").version == 1
    assert client.lookup_schema("cl-value", Schema(json.dumps(V1), "AVRO")).schema_id == schema_id
    assert client.test_compatibility("cl-value", Schema(json.dumps(V2_WITH_DEFAULT), "AVRO"))
    with pytest.raises(SchemaRegistryError):
        client.register_schema("cl-value", Schema(json.dumps(V2_WITHOUT_DEFAULT), "AVRO"))


def test_the_command_line_writes_its_port_and_serves(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    script = Path(__file__).resolve().parent / "registry.py"
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--port-file", str(port_file)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        port = int(port_file.read_text())
        response = requests.get(f"http://127.0.0.1:{port}/subjects", timeout=10)
        assert response.json() == []
    finally:
        process.terminate()
        process.wait(timeout=10)
