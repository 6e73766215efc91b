#!/usr/bin/env bash
# Helpers of scripts/demo.sh, in a file of their own so tests can drive
# them (tests/python/test_demo_ports.py).

# demo_alive PID: true while the process runs (a zombie counts as gone).
demo_alive() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z* ]]
}

# demo_watch NAME PID LOG: true while PID runs (or when PID is empty);
# otherwise says on stderr that NAME exited, with the end of LOG, and fails.
demo_watch() {
    local name="$1" pid="$2" log="$3"
    [[ -z "$pid" ]] && return 0
    demo_alive "$pid" && return 0
    echo >&2
    echo "error: the $name (pid $pid) exited; the demo cannot go on. The end of its log ($log):" >&2
    tail -n 15 "$log" 2>/dev/null | sed 's/^/    /' >&2
    return 1
}

# demo_port_free PORT: true when nothing listens on 127.0.0.1:PORT and it
# can be bound.
demo_port_free() {
    python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

# demo_port NAME [PORT]: prints PORT when it is free, else fails naming NAME
# and the port; without PORT, prints a free port the OS picked.
demo_port() {
    local name="$1" port="${2:-}"
    if [[ -z "$port" ]]; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
        echo "error: the $name port $port is not a port number" >&2
        return 1
    fi
    if ! demo_port_free "$port"; then
        echo "error: the $name port 127.0.0.1:$port is already in use by another program; free it, or leave DEMO_$(echo "$name" | tr '[:lower:]' '[:upper:]')_PORT unset to use a free port" >&2
        return 1
    fi
    echo "$port"
}
