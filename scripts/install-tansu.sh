#!/usr/bin/env bash
# Installs the tansu Kafka-compatible broker used by the integration tests,
# unless a binary of the pinned version is already on PATH (or in ~/.cargo/bin).
# The build takes ~16 minutes on 2 cores, so an installed binary is reused.
set -euo pipefail

TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
TANSU_FEATURES="${TANSU_FEATURES:-dynostore,libsql}"

export PATH="$HOME/.cargo/bin:$PATH"

have_version() {
  command -v tansu >/dev/null 2>&1 || return 1
  local marker="$HOME/.cargo/.tansu-installed"
  # `tansu --version` prints the version; the marker records the features.
  tansu --version 2>/dev/null | grep -q "$TANSU_VERSION" || return 1
  [ -f "$marker" ] && grep -qx "$TANSU_VERSION $TANSU_FEATURES" "$marker"
}

if have_version; then
  echo "tansu $TANSU_VERSION ($TANSU_FEATURES) already installed: $(command -v tansu)"
  exit 0
fi

echo "building tansu $TANSU_VERSION with features $TANSU_FEATURES (this takes a while)"
cargo install --locked tansu --version "$TANSU_VERSION" --features "$TANSU_FEATURES"
mkdir -p "$HOME/.cargo"
echo "$TANSU_VERSION $TANSU_FEATURES" > "$HOME/.cargo/.tansu-installed"
tansu --version
