#!/usr/bin/env bash
# The long fault suite: the same tests as the test command's fault tests
# (tests/it/faults.rs, tests/it/crash.rs) with production-sized numbers:
# 50 000 events and five SIGKILLs, a 60 s API outage. Prints the figures
# that docs/reliability.md quotes. Needs tansu (scripts/install-tansu.sh).
#
#   bash scripts/faults.sh                 # FAULT_EVENTS=50000 OUTAGE_SECS=60
#   FAULT_EVENTS=10000 bash scripts/faults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/install-tansu.sh
export FAULT_EVENTS="${FAULT_EVENTS:-50000}"
export OUTAGE_SECS="${OUTAGE_SECS:-60}"
cargo test --locked --release --test it -- --test-threads 1 --nocapture faults:: crash::
