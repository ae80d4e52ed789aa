#!/usr/bin/env bash
# Builds pingora-vhost (release) and starts one node on config.example.toml (or the file given).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
cargo build --release
exec ./target/release/pingora-vhost --config "${1:-config.example.toml}"
