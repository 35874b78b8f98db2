#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (the
# tansu broker, the Python packages of the deploy checks), then runs unit and
# integration tests (which start their own tansu processes on loopback) and
# the checks of the Helm chart and kustomize manifests (tests/deploy).
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

# Deployment checks: Helm's SDK (no helm binary), Kubernetes schemas, pytest.
command -v kubectl >/dev/null || { echo "kubectl (with kustomize) is required for the deploy/ checks"; exit 1; }
python3 -m pip install --quiet --disable-pip-version-check -r tests/deploy/requirements.txt

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked --all-targets
cargo test --locked --lib --bins --tests -- --test-threads "${TEST_THREADS:-2}"
UINCALL_BIN="$PWD/target/debug/uincall-enricher" python3 -m pytest -q tests/deploy
