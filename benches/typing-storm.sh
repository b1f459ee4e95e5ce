#!/usr/bin/env bash
# Typing storm against the relay, the reference Node server and the samod peer
# (benches/samod-peer), T = 4, 16, 64 (20 s each). Prints one JSON line per run, then a table.
# Extra arguments go to the load generator, e.g. `benches/typing-storm.sh --seconds 5 --typists 4,16`.
#
# Needs `npm ci --prefix tests/js` once (for the reference server).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release
# The samod peer is its own cargo project (own workspace, own lock file and target dir).
CARGO_TARGET_DIR=benches/samod-peer/target \
    cargo build --release --manifest-path benches/samod-peer/Cargo.toml
exec cargo bench --bench typing_storm -- \
    --spawn-relay "${CARGO_TARGET_DIR:-target}/release/automerge-relay" \
    --spawn-reference \
    --spawn-samod benches/samod-peer/target/release/samod-peer \
    --typists 4,16,64 \
    --seconds 20 \
    "$@"
