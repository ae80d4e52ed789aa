# Convenience recipes; each mirrors a script so nothing depends on `just` being installed.

# Build (release) and start one node on config.example.toml
run config="config.example.toml":
    ./scripts/start.sh {{config}}

# The whole test suite (what CI runs)
test:
    ./scripts/test.sh

# Benchmark beside nginx and HAProxy
bench:
    ./bench/run.sh

check config="config.example.toml":
    cargo run -- --config {{config}} --check

lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings
