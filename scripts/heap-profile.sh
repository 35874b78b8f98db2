#!/usr/bin/env bash
# Where the worker's heap goes at one sweep point: the worker built with
# glibc's malloc (feature system-alloc, in target/system-alloc) runs under
# heaptrack's preload library inside `cargo bench --bench sweep`, and the
# largest peak consumers are printed. heaptrack slows the worker down
# several times, so the window fills but the throughput is not the sweep's.
#
#   bash scripts/heap-profile.sh                       # window 1 024, 50 ms
#   bash scripts/heap-profile.sh --points 64/0 --api-http2
#
# The sweep's own options follow; the profile is left in target/heap-profile.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v heaptrack_print > /dev/null; then
  apt-get update -qq && apt-get install -y -qq heaptrack > /dev/null
fi
preload=/usr/lib/heaptrack/libheaptrack_preload.so
interpret=/usr/lib/heaptrack/libexec/heaptrack_interpret
[ -f "$preload" ] || preload=$(dpkg -L heaptrack | grep 'libheaptrack_preload.so$')
[ -f "$interpret" ] || interpret=$(dpkg -L heaptrack | grep 'heaptrack_interpret$')

CARGO_TARGET_DIR=target/system-alloc cargo build --release --locked \
  --features system-alloc --bin uincall-enricher
out="$PWD/target/heap-profile"
rm -rf "$out" && mkdir -p "$out"
# The sweep starts the worker (and its topic helpers) through this wrapper:
# the profiled process is the worker itself, so signals reach it.
cat > "$out/worker.sh" <<EOF
#!/usr/bin/env bash
pipe="$out/fifo.\$\$"
mkfifo "\$pipe"
"$interpret" < "\$pipe" | gzip -c > "$out/heap.\$\$.gz" &
exec env LD_PRELOAD="$preload" DUMP_HEAPTRACK_OUTPUT="\$pipe" \
  "$PWD/target/system-alloc/release/uincall-enricher" "\$@"
EOF
chmod +x "$out/worker.sh"

KAFKA_LIB="$(bash scripts/install-kafka.sh)"
export KAFKA_LIB
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--points 1024/50)
SWEEP_WORKER_BIN="$out/worker.sh" cargo bench --locked --bench sweep -- \
  --no-raw --out "$out/sweep" --seconds 10 "${args[@]}"

# The run command's profile is the largest.
profile=$(ls -S "$out"/heap.*.gz | head -1)
heaptrack_print -f "$profile" --print-peaks 1 --print-allocators 0 \
  --print-temporary 0 --print-leaks 0 -n 20 -s 0 2> /dev/null
