#!/usr/bin/env bash
# The long fault suite: the test command's fault, crash, group and broker
# tests (tests/it/faults.rs, crash.rs, group.rs, brokers.rs) on a release
# build, the crash test with 50 000 events and five worker SIGKILLs, the
# API outage lasting 60 s. Prints the figures docs/reliability.md quotes.
# Runs against Apache Kafka like the test command (scripts/install-kafka.sh
# fetches it once).
#
#   bash scripts/faults.sh                          # FAULT_EVENTS=50000 OUTAGE_SECS=60
#   FAULT_EVENTS=10000 bash scripts/faults.sh       # shorter
#   GROUP_EVENTS=20000 BROKER_EVENTS=20000 bash scripts/faults.sh
#                                                    # longer group and broker runs
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
KAFKA_LIB="$(bash scripts/install-kafka.sh)"
export KAFKA_LIB
export FAULT_EVENTS="${FAULT_EVENTS:-50000}"
export OUTAGE_SECS="${OUTAGE_SECS:-60}"
cargo test --locked --release --test it -- --test-threads 1 --nocapture \
  faults:: crash:: group:: brokers::
