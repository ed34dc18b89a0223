#!/bin/sh
# Installs Debian's Chromium for the browser tests (tests/test_web_ui.py), unless
# /usr/bin/chromium is already there. Idempotent. Playwright drives this binary;
# it never downloads a browser of its own (no `playwright install`).
set -eu

if [ -x /usr/bin/chromium ]; then
    echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present) at /usr/bin/chromium"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
/usr/bin/chromium --version 2>/dev/null || true
