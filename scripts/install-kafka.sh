#!/usr/bin/env bash
# Fetches the Apache Kafka broker's jars from Maven Central once, into a
# cache outside the repository, and prints that directory. Reused when the
# jars of this version are there already.
#
#   KAFKA_LIB=$(bash scripts/install-kafka.sh)
#
# Needs Java 17+ and Maven (installed from Debian's packages when missing
# and this runs as root).
set -euo pipefail
cd "$(dirname "$0")/kafka"

version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' pom.xml)
cache="${KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/uincall-enricher}"
lib="$cache/kafka-$version/lib"
stamp="$lib/.complete-$(sha256sum pom.xml | cut -c1-16)"

need_java() {
  command -v java >/dev/null || return 0
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  [ "${v:-0}" -lt 17 ]
}
if need_java || ! command -v mvn >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "Java 17+ and Maven are required" >&2; exit 1; }
  echo "installing Java 17 and Maven" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null
fi

if [ ! -f "$stamp" ]; then
  echo "fetching Apache Kafka $version jars into $lib" >&2
  rm -rf "$lib"
  mkdir -p "$lib"
  mvn -q -B dependency:copy-dependencies \
    -DoutputDirectory="$lib" -DincludeScope=runtime >&2
  touch "$stamp"
fi
echo "$lib"
