"""The demo's guards (scripts/demo.sh, scripts/demo-lib.sh, scripts/demo.py)
and the prerequisite check (scripts/prereqs.sh), run for real: a port held
by another socket, the real simulator failing to bind it, tools missing
from PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIB = REPO / "scripts" / "demo-lib.sh"
BIN = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "insights-enricher"

sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402


def lib(script: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f'source "{LIB}"; {script}'],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


@pytest.fixture
def held_port():
    """A port another program listens on for the test's duration."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_a_held_port_is_refused_naming_it(held_port):
    r = lib(f"demo_port simulator {held_port}")
    assert r.returncode == 1, r
    assert r.stdout == ""
    assert f"127.0.0.1:{held_port} is already in use" in r.stderr, r.stderr
    assert "DEMO_SIMULATOR_PORT" in r.stderr, r.stderr


def test_without_a_port_a_free_one_is_picked(held_port):
    r = lib("demo_port metrics")
    assert r.returncode == 0, r
    port = int(r.stdout)
    assert port != held_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free indeed
    r = lib(f"demo_port metrics {port}")
    assert (r.returncode, r.stdout.strip()) == (0, str(port)), r


def test_the_demo_stops_before_any_work_when_its_port_is_held(held_port):
    started = time.monotonic()
    demo_sh = subprocess.Popen(
        [str(REPO / "scripts" / "demo.sh")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "DEMO_SIMULATOR_PORT": str(held_port)},
    )
    try:
        out, err = demo_sh.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # It went on instead of stopping: SIGTERM runs its cleanup.
        demo_sh.terminate()
        out, err = demo_sh.communicate(timeout=60)
    r = subprocess.CompletedProcess(demo_sh.args, demo_sh.returncode, out, err)
    took = time.monotonic() - started
    assert r.returncode == 1, r
    assert f"127.0.0.1:{held_port} is already in use" in r.stderr, r.stderr
    assert "== building" not in r.stdout and "starting Apache Kafka" not in r.stdout, r.stdout
    assert took < 60, took


def test_a_process_that_exits_stops_the_demo_with_its_log(held_port, tmp_path):
    """The real simulator on a held port: demo_watch notices it exited and
    shows why, once; a running process passes."""
    assert BIN.exists(), f"build the binary first (cargo build): {BIN}"
    log = tmp_path / "simulator.log"
    with open(log, "w") as out:
        sim = subprocess.Popen(
            [str(BIN), "simulate", "--listen", f"127.0.0.1:{held_port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # The watch loop demo.sh runs, over a running and the failing process.
        r = lib(
            f"while demo_watch other {sleeper.pid} /dev/null && "
            f"demo_watch simulator {sim.pid} {log}; do sleep 0.2; done; echo stopped",
            timeout=30,
        )
        assert r.stdout.strip() == "stopped", r
        assert f"error: the simulator (pid {sim.pid}) exited" in r.stderr, r.stderr
        assert "Address already in use" in r.stderr, r.stderr
        assert r.stderr.count("Address already in use") == 1, r.stderr
        assert "the other" not in r.stderr
        # A running process passes; an empty pid (not started yet) too.
        assert lib(f"demo_watch other {sleeper.pid} /dev/null").returncode == 0
        assert lib('demo_watch other "" /dev/null').returncode == 0
    finally:
        sleeper.kill()
        sleeper.wait()
        sim.wait(timeout=10)


def test_dead_letter_messages_are_cut_between_words():
    msg = "provider finbox answered 403 Forbidden: the api key was rejected by the provider gateway"
    short = demo.shorten(msg, 40)
    assert len(short) <= 40
    assert short.endswith("…")
    assert msg.startswith(short[:-1])
    assert msg[len(short) - 1] == " ", short  # the cut falls on a space
    assert demo.shorten("short", 40) == "short"


def test_progress_counts_each_provider_and_topic_kind_apart():
    text = "\n".join([
        '# HELP x',
        'insights_provider_requests_total{http_status="200",outcome="complete",provider="finbox"} 3',
        'insights_provider_requests_total{http_status="200",outcome="complete",provider="credeau"} 5',
        'insights_events_consumed_total{result="accepted",topic="input"} 7',
        'insights_events_consumed_total{result="due",topic="delay"} 11',
    ])
    m = demo.metric_sums(text)
    assert m["insights_provider_requests_total[finbox]"] == 3
    assert m["insights_provider_requests_total[credeau]"] == 5
    assert m["insights_events_consumed_total[input]"] == 7
    assert m["insights_events_consumed_total[delay]"] == 11
    # Every scenario prefix the demo sends is in the legend.
    for prefix in demo.MIX:
        assert f" {prefix} " in f" {demo.LEGEND.split(': ', 1)[1]} ", prefix


def fake_path(tmp_path: Path, tools: list[str]) -> str:
    """A PATH holding only `tools` (links to the real ones) and bash."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for t in tools + ["bash", "sed", "head", "env"]:
        real = sys.executable if t == "python3" else shutil.which(t)
        if real:
            (bindir / t).symlink_to(real)
    return str(bindir)


def test_prereqs_pass_here_and_name_each_missing_tool(tmp_path):
    for what in ("demo", "test"):
        r = subprocess.run([str(REPO / "scripts" / "prereqs.sh"), what],
                           capture_output=True, text=True, cwd=REPO)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r
    keep = ["cargo", "cc", "c++", "make", "pkg-config", "python3", "ps", "curl"]
    path = fake_path(tmp_path, keep)
    r = subprocess.run(["bash", str(REPO / "scripts" / "prereqs.sh"), "demo"],
                       capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PATH": path})
    assert r.returncode == 1, r
    lines = r.stderr.splitlines()
    assert lines[0] == "error: 2 prerequisite(s) of scripts/demo.sh missing:", r.stderr
    assert lines[1].startswith("  - java (Java 17 or newer"), r.stderr
    assert "openjdk-17" in lines[1]
    assert lines[2].startswith("  - mvn (Maven"), r.stderr
    assert len(lines) == 3, r.stderr
