#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Debian's chromium for the Playwright browser
# test (tests/test_serving_browser.py drives /usr/bin/chromium; `playwright install` is never used).
# Idempotent and quiet: does nothing when chromium is already installed.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
