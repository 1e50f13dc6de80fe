#!/usr/bin/env bash
# Installs the load generator for `make bench` and its smoke test: h2load, from Debian's nghttp2-client.
# `apt-get update` runs only when the package cannot be installed from the current package lists.
set -euo pipefail
command -v h2load >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "bench: h2load (Debian package nghttp2-client) is missing and we are not root: install it with" >&2
  echo "       apt-get install -y nghttp2-client" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq nghttp2-client >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq nghttp2-client >/dev/null
fi
command -v h2load >/dev/null 2>&1 || { echo "bench: nghttp2-client installed but h2load is not on PATH" >&2; exit 1; }
echo "bench: installed $(h2load --version | head -1)"
