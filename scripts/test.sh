#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests that start the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
cargo build --all-targets
cargo test --all-targets -- --test-threads="${TEST_THREADS:-4}"
