#!/usr/bin/env bash
# Runs one integration test (or a filter) many times against Apache Kafka,
# with both cores kept busy beside it, and counts the runs that passed: an
# intermittent failure shows up here, not in a single run.
#
#   bash scripts/repeat.sh 20 ingest::pushes_answered_200_survive_a_broker_outage
#   BUSY=0 bash scripts/repeat.sh 5 group::a_broker_frozen   # no load beside
#
# Each busy loop is a shell `while :` bounded by the script's own lifetime;
# the failed runs' output is kept in target/repeat/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
runs="${1:?how many runs}"
filter="${2:?which test}"
KAFKA_LIB="$(bash scripts/install-kafka.sh)"
export KAFKA_LIB
cargo test --locked --test it --no-run >/dev/null 2>&1

busy=()
cleanup() { for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
if [ "${BUSY:-1}" != 0 ]; then
  for _ in $(seq "$(nproc)"); do
    (while :; do :; done) &
    busy+=("$!")
  done
fi

mkdir -p target/repeat
passed=0
for i in $(seq "$runs"); do
  out="target/repeat/run-$i.log"
  if cargo test --locked --test it -- --test-threads 1 --nocapture "$filter" >"$out" 2>&1; then
    passed=$((passed + 1))
    rm -f "$out"
    echo "run $i: passed"
  else
    echo "run $i: FAILED (output in $out)"
  fi
done
echo "$passed passed, $((runs - passed)) failed"
[ "$passed" = "$runs" ]
