#!/usr/bin/env bash
# Typing storm against the relay and the reference Node server, T = 4, 16, 64 (20 s each).
# Prints one JSON line per run, then a table. Extra arguments go to the load generator,
# e.g. `benches/typing-storm.sh --seconds 5 --typists 4,16`.
#
# Needs `npm ci --prefix tests/js` once (for the reference server).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release
exec cargo bench --bench typing_storm -- \
    --spawn-relay target/release/automerge-relay \
    --spawn-reference \
    --typists 4,16,64 \
    --seconds 20 \
    "$@"
