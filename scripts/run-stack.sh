#!/usr/bin/env bash
# `make run`: the worker on its demo model and the gateway in front of it, both healthy
# before the URL is printed; Ctrl-C (or either process dying) stops both.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
WORKER_PORT=${WORKER_PORT:-8000}
GATEWAY_PORT=${GATEWAY_PORT:-3333}
GATEWAY_HOST=${GATEWAY_HOST:-127.0.0.1}
GATEWAY_CONFIG=${GATEWAY_CONFIG:-config.example.json}

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    wait 2>/dev/null
    echo "stopped."
}
trap stop INT TERM EXIT

alive() {
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done
}

wait_healthy() { # name url seconds
    local deadline=$((SECONDS + $3))
    until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$2" 2>/dev/null; do
        if ! alive; then echo "$1 exited before it was healthy; see the log above." >&2; exit 1; fi
        if ((SECONDS > deadline)); then echo "$1 not healthy after $3 s" >&2; exit 1; fi
        sleep 0.5
    done
}

"$PY" -m worker --model demo --host 127.0.0.1 --port "$WORKER_PORT" &
pids+=($!)
"$PY" -m gateway --config "$GATEWAY_CONFIG" --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" &
pids+=($!)

wait_healthy worker "http://127.0.0.1:$WORKER_PORT/health" 300
wait_healthy gateway "http://127.0.0.1:$GATEWAY_PORT/health" 60

cat <<MSG

  Gateway ready: http://127.0.0.1:$GATEWAY_PORT/v1   (worker: http://127.0.0.1:$WORKER_PORT/v1)
  Try:
    curl -s http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'
  The demo model has random weights: its answers are gibberish, by design.
  Ctrl-C stops both.

MSG

# Return as soon as either process exits; the trap stops the other.
wait -n "${pids[@]}"
