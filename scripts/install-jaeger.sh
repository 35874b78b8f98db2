#!/usr/bin/env bash
# Builds Jaeger v2 (an OpenTelemetry trace receiver with in-memory storage
# and a query API) from the Go module proxy once, into a cache outside the
# repository, and prints the binary's path. Reused when the binary built
# from these module files is there already.
#
#   JAEGER_BIN=$(bash scripts/install-jaeger.sh)
#
# Needs Go 1.24.6+; the versions are pinned in scripts/jaeger/go.mod and
# go.sum. A cold build takes some minutes.
set -euo pipefail
cd "$(dirname "$0")/jaeger"

version=$(sed -n 's:^[[:space:]]*github.com/jaegertracing/jaeger \(v[^ ]*\).*:\1:p' go.mod)
cache="${JAEGER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/uincall-enricher}"
dir="$cache/jaeger-${version#v}"
bin="$dir/jaeger"
stamp="$dir/.complete-$(cat go.mod go.sum | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ] || [ ! -x "$bin" ]; then
  # A Go installed from go.dev may not be on a non-interactive PATH.
  command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null || {
    echo "Go 1.24.6+ is required to build Jaeger (https://go.dev/dl/)" >&2
    exit 1
  }
  echo "building Jaeger $version into $dir" >&2
  mkdir -p "$dir"
  rm -f "$dir"/.complete-*
  # Into a file of this run's own, then renamed: a concurrent run never
  # sees half a binary.
  GOWORK=off GOFLAGS=-mod=readonly \
    go build -trimpath \
    -ldflags "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=$version" \
    -o "$bin.$$" github.com/jaegertracing/jaeger/cmd/jaeger >&2
  mv -f "$bin.$$" "$bin"
  touch "$stamp"
fi
echo "$bin"
