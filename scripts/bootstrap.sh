#!/usr/bin/env bash
# Installs what a fresh Debian machine with a Rust toolchain lacks for building and testing
# pingora-vhost. Idempotent; safe to run every time.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)          # pingora-core builds zlib-ng
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)  # metrics format check in tests
command -v pebble >/dev/null 2>&1 || need+=(pebble)          # ACME test CA (+ pebble-challtestsrv)
command -v chromium >/dev/null 2>&1 || need+=(chromium)      # renders the dashboard in tests
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)  # the origin of bench/probe_load_bench.py
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)  # DNS server for the resolver tests
# Network namespaces and packet drops for the partition tests (tests/it/partition.rs) and
# bench/partition_bench.py.
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need+=(iptables)
# A real L4 balancer sending the PROXY protocol, and a backend requiring it (tests/it/edge.rs).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)

if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "bootstrap: cargo not found; install the Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi
