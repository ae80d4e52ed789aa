#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests that start the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
cargo build --all-targets
# The Docker deploy test packages the release binary: build it here, alone, rather than from
# inside the test run, where minutes of fat LTO on the same cores made the timing-sensitive
# tests beside it (partitions, 10,000-backend gossip) miss their bounds.
cargo build --release --bin pingora-vhost
cargo test --all-targets -- --test-threads="${TEST_THREADS:-4}"
