#!/usr/bin/env bash
# The long fault suite: the same tests as the test command's fault tests
# (tests/it/faults.rs, tests/it/crash.rs) with larger numbers: 10 000
# events and five SIGKILLs, a 60 s API outage. Prints the figures that
# docs/reliability.md quotes. Needs tansu (scripts/install-tansu.sh).
# tansu 0.6.0 on two cores stops answering group requests somewhere past
# 13 000 records of the crash test (docs/reliability.md), hence 10 000.
#
#   bash scripts/faults.sh                 # FAULT_EVENTS=10000 OUTAGE_SECS=60
#   FAULT_EVENTS=50000 bash scripts/faults.sh   # against a broker that copes
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/install-tansu.sh
export FAULT_EVENTS="${FAULT_EVENTS:-10000}"
export OUTAGE_SECS="${OUTAGE_SECS:-60}"
cargo test --locked --release --test it -- --test-threads 1 --nocapture faults:: crash::
