#!/usr/bin/env bash
# nginx and its echo module from Debian's packages: the API that
# `cargo bench --bench sweep` calls by default (docs/benchmarks.md).
set -euo pipefail
if command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; then
    exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    nginx-light libnginx-mod-http-echo
# The package starts a system nginx on port 80; the sweep starts its own.
$sudo service nginx stop >/dev/null 2>&1 || true
