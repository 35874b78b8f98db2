#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (Java and
# Maven, Apache Kafka's jars and a Jaeger build into a cache outside the
# repository, the Python packages of the deploy checks), then runs unit and
# integration tests (the integration tests start one Apache Kafka broker for
# the run, a three-node cluster for the broker-fault tests, and Jaeger for
# the trace tests, on loopback) and the checks of the Helm chart and
# kustomize manifests (tests/deploy).
#
# KAFKA_BOOTSTRAP=host:port runs the broker tests against an existing cluster
# instead (the broker-fault tests still start their own).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
# librdkafka (with cmake), OpenSSL and libcurl are built from source by their
# crates.
for tool in cc make perl cmake; do
  command -v "$tool" >/dev/null || missing="${missing:-} $tool"
done
if [ -n "${missing:-}" ]; then
  echo "installing build tools:$missing"
  apt-get update -qq && apt-get install -y -qq build-essential perl cmake >/dev/null
fi

KAFKA_LIB="$(bash scripts/install-kafka.sh)"
export KAFKA_LIB
# The trace tests' OTLP receiver: Jaeger, built once from the Go module proxy.
JAEGER_BIN="$(bash scripts/install-jaeger.sh)"
export JAEGER_BIN

# Deployment checks: Helm's SDK (no helm binary), Kubernetes schemas, pytest.
command -v kubectl >/dev/null || { echo "kubectl (with kustomize) is required for the deploy/ checks"; exit 1; }
python3 -m pip install --quiet --disable-pip-version-check -r tests/deploy/requirements.txt

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked --all-targets
# The binary carries no test scaffolding: it builds without the demo, and no
# test-only crate is a normal dependency.
cargo build --locked --no-default-features
if cargo tree --locked -e normal --prefix none | grep -E '^(tempfile|proptest|criterion|jsonschema) '; then
  echo "a test-only crate is a normal dependency (see above)"; exit 1
fi
cargo test --locked --lib --bins --tests -- --test-threads "${TEST_THREADS:-2}"
UINCALL_BIN="$PWD/target/debug/uincall-enricher" python3 -m pytest -q tests/deploy
