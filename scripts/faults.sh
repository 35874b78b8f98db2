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
#   FAULT_WINDOW=128 FAULT_COMMIT_INTERVAL=50ms FAULT_METADATA_MAX_BYTES=0 \
#     bash scripts/faults.sh                        # crash re-delivery by setting
#
# The broker-freeze tests (group::a_broker_frozen_…) run here at the
# production-like size: 1 000 events/s, a window of 256, 5 freezes of 12 s
# (FREEZE_RATE, FREEZE_WINDOW, FREEZE_ROUNDS; GROUP_EVENTS sizes the load).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
KAFKA_LIB="$(bash scripts/install-kafka.sh)"
export KAFKA_LIB
export FAULT_EVENTS="${FAULT_EVENTS:-50000}"
export OUTAGE_SECS="${OUTAGE_SECS:-60}"
export FREEZE_RATE="${FREEZE_RATE:-1000}"
export FREEZE_WINDOW="${FREEZE_WINDOW:-256}"
export FREEZE_ROUNDS="${FREEZE_ROUNDS:-5}"
cargo test --locked --release --test it -- --test-threads 1 --nocapture \
  faults:: crash:: group:: brokers::
