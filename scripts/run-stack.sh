#!/usr/bin/env bash
# `make run`: the worker on a built-in model (SmolLM2 135M Instruct unless MODEL says otherwise)
# and the gateway in front of it, both healthy before the URL is printed; Ctrl-C (or either
# process dying) stops both.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
# Exported: config.example.json reads it for the worker's URL.
export WORKER_PORT=${WORKER_PORT:-8000}
GATEWAY_PORT=${GATEWAY_PORT:-3333}
GATEWAY_HOST=${GATEWAY_HOST:-127.0.0.1}
GATEWAY_CONFIG=${GATEWAY_CONFIG:-config.example.json}
MODEL=${MODEL:-smollm2}
# The id clients send is the gateway's (its config's first endpoint), not the worker's.
PUBLIC_MODEL=$("$PY" -c 'import json, sys; print(next(iter(json.load(open(sys.argv[1]))["endpoints"])))' "$GATEWAY_CONFIG" 2>/dev/null || echo "$MODEL")

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

if [[ $MODEL == smollm2 ]]; then
    echo "Starting the worker on SmolLM2 135M Instruct (the first start converts it: about 30 s)."
fi
"$PY" -m worker --model "$MODEL" --host 127.0.0.1 --port "$WORKER_PORT" &
pids+=($!)
"$PY" -m gateway --config "$GATEWAY_CONFIG" --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" &
pids+=($!)

wait_healthy worker "http://127.0.0.1:$WORKER_PORT/health" 600
wait_healthy gateway "http://127.0.0.1:$GATEWAY_PORT/health" 60

cat <<MSG

  Gateway ready: http://127.0.0.1:$GATEWAY_PORT/v1   (worker: http://127.0.0.1:$WORKER_PORT/v1)
  Try:
    curl -s http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "$PUBLIC_MODEL", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, "temperature": 0}'
MSG
if [[ $MODEL == demo ]]; then
    echo "  The demo model has random weights: its answers are gibberish, by design."
fi
printf '  Ctrl-C stops both.\n\n'

# Return as soon as either process exits; the trap stops the other.
wait -n "${pids[@]}"
