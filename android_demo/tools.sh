#!/usr/bin/env bash
# The JVM tools the Android library module's tests need on this machine (no Android SDK here): kotlinc from npm's
# `kotlin-compiler` (its lib/ carries kotlin-stdlib and kotlinx-coroutines-core-jvm) and Debian's org.json
# (`libandroid-json-java`, the API Android ships), each installed only when missing. `make setup` calls `install`.
#   android_demo/tools.sh check|install|env     (env: prints KOTLINC=, KOTLIN_LIB=, ANDROID_JSON_JAR= lines)
set -euo pipefail
KOTLIN_VERSION=2.4.20
CACHE=${COSMOES_CACHE:-$HOME/.cache/cosmoes}
KOTLIN_HOME=$CACHE/kotlinc-$KOTLIN_VERSION
JSON_JAR=/usr/share/java/com.android.json.jar  # the name Debian gives libandroid-json-java's jar
DEBS="libandroid-json-java"

kotlinc_bin() { echo "$KOTLIN_HOME/node_modules/kotlin-compiler/bin/kotlinc"; }
kotlin_lib() { echo "$KOTLIN_HOME/node_modules/kotlin-compiler/lib"; }

have_kotlinc() { [ -x "$(kotlinc_bin)" ] && [ -f "$(kotlin_lib)/kotlinx-coroutines-core-jvm.jar" ]; }
have_json() { [ -f "$JSON_JAR" ]; }
have_java() { command -v java > /dev/null; }

install_kotlinc() {
  have_kotlinc && return 0
  command -v npm > /dev/null || { echo "android_demo/tools.sh: no npm to install kotlin-compiler@$KOTLIN_VERSION" >&2; return 1; }
  # npm's package has no install scripts; --ignore-scripts keeps it that way whatever a later version adds
  mkdir -p "$KOTLIN_HOME"
  npm install --prefix "$KOTLIN_HOME" --no-save --ignore-scripts --no-audit --no-fund --loglevel=error \
    "kotlin-compiler@$KOTLIN_VERSION" > /dev/null
  chmod +x "$(kotlin_lib)/../bin/"* 2> /dev/null || true
  have_kotlinc || { echo "android_demo/tools.sh: kotlin-compiler@$KOTLIN_VERSION installed, but $(kotlinc_bin) or its coroutines jar is missing" >&2; return 1; }
}

install_debs() {
  have_json && have_java && return 0
  command -v apt-get > /dev/null || { echo "android_demo/tools.sh: no apt-get to install $DEBS" >&2; return 1; }
  local debs=$DEBS
  have_java || debs="$debs openjdk-17-jdk-headless"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $debs > /dev/null
  have_json && have_java || { echo "android_demo/tools.sh: $debs installed, but $JSON_JAR or java is still missing" >&2; return 1; }
}

case "${1:-check}" in
  check) have_kotlinc && have_json && have_java ;;
  install) install_kotlinc && install_debs ;;
  env) echo "KOTLINC=$(kotlinc_bin)"; echo "KOTLIN_LIB=$(kotlin_lib)"; echo "ANDROID_JSON_JAR=$JSON_JAR" ;;
  *) echo "usage: android_demo/tools.sh check|install|env" >&2; exit 2 ;;
esac
