"""scripts/registry.sh and scripts/kafka.sh refuse to start, with a clear
message, when the port is taken or the Java found is too old; and the run's
registry (TEST_SCHEMA_REGISTRY, or one started for the session) serves a
decision engine's reader: confluent-kafka's SchemaRegistryClient."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


def java_17() -> str:
    """A Java older than 21 on this machine (the brokers' Java 17)."""
    for candidate in ("/usr/lib/jvm/java-17-openjdk-amd64/bin/java", shutil.which("java") or ""):
        if candidate and os.access(candidate, os.X_OK):
            shown = subprocess.run(
                [candidate, "-XshowSettings:properties", "-version"],
                capture_output=True,
                text=True,
                check=False,
            ).stderr
            if "java.specification.version = 17" in shown:
                return candidate
    raise AssertionError("no Java 17 on this machine to stand for a too-old one")


def test_the_registry_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        done = run("registry.sh", "start", "--dir", str(tmp_path / "r"), "--port", str(port))
    assert done.returncode == 1
    assert f"port {port} is already in use" in done.stderr
    assert not (tmp_path / "r" / "pid").exists()


def test_the_registry_names_the_java_it_found_when_none_is_21_or_newer(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(java_17())
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "REGISTRY_JAVA")},
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "REGISTRY_JVM_DIR": str(tmp_path / "no-jvms"),
    }
    done = run("registry.sh", "start", "--dir", str(tmp_path / "r"), env=env)
    assert done.returncode == 1
    assert "needs Java 21 or newer" in done.stderr
    assert f"{bin_dir}/java (Java 17)" in done.stderr


def test_the_broker_refuses_a_java_older_than_17(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A stand-in for an old JDK: it only answers the version question.
    old = bin_dir / "java"
    old.write_text("#!/bin/sh\necho '    java.specification.version = 11' >&2\n")
    old.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = run("kafka.sh", "fetch", env=env)
    assert done.returncode == 1
    assert "needs Java 17 or newer" in done.stderr and "Java 11" in done.stderr


def test_a_decision_engines_registry_client_reads_what_was_registered(registry: str) -> None:
    subject = f"pytest-{uuid.uuid4().hex[:10]}-value"
    schema = {
        "type": "record",
        "name": "Probe",
        "fields": [{"name": "user_id", "type": "string"}],
    }
    client = SchemaRegistryClient({"url": registry})
    schema_id = client.register_schema(subject, Schema(json.dumps(schema), "AVRO"))
    fetched = client.get_schema(schema_id)
    assert json.loads(fetched.schema_str)["name"] == "Probe"
    assert client.get_latest_version(subject).schema_id == schema_id
