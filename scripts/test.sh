#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (the
# tansu broker, cargo-nextest if absent), then runs unit and integration
# tests. Integration tests start their own tansu processes on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
# librdkafka and OpenSSL are built from source by their crates.
for tool in cc make perl; do
  command -v "$tool" >/dev/null || missing="${missing:-} $tool"
done
if [ -n "${missing:-}" ]; then
  echo "installing build tools:$missing"
  apt-get update -qq && apt-get install -y -qq build-essential perl >/dev/null
fi

bash scripts/install-tansu.sh

cargo fmt --all -- --check
cargo build --locked --all-targets
cargo test --locked --lib --bins --tests -- --test-threads "${TEST_THREADS:-2}"
