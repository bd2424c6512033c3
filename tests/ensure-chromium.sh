#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/browser.py: headless, no driver, no browser
# download): nothing to do when one is installed; as root on Debian, install it. Anything else
# gets one line and exit 2.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "ensure-chromium: no chromium, and installing it needs root on Debian" >&2
  exit 2
fi
install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
    >/dev/null 2>&1 || {
    apt-get update -q >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
  }
}
install
