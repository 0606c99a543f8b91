#!/usr/bin/env bash
# The crash-and-fault torture harness (issue 4): builds the release walsync and the harness
# (the test kit's `torture` program, testkit/src/bin/torture.rs, whose logic is
# testkit/src/torture.rs), then runs rounds of random transactions while walsync is
# SIGKILLed and restarted, the application checkpoints, the S3 server stops and restarts and
# injects HTTP faults (500, 503, truncated bodies), and a proxy TCP ones (resets, stalls,
# delays); every round ends with a clean SIGTERM and checked restores (latest and points in
# time).
#
#   scripts/torture.sh [--rounds N] [--seed S] [--round R] [--round-secs SECS]
#
# Defaults: 20 rounds, seed 1, 8 s of chaos per round. A failure prints the seed and round
# to rerun it alone (--seed S --round R --rounds 1) and keeps that round's directory.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --release --bin walsync
# The harness itself needs no optimisation beyond the dev profile's optimised dependencies.
cargo build --locked -p walsync-testkit --bin torture
exec target/debug/torture --walsync target/release/walsync "$@"
