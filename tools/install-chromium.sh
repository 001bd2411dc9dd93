#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser test (Playwright drives it through
# `executable_path`; Playwright's own browser download needs the internet). Does
# nothing when a Chromium is already there (or $CHROMIUM names one).
set -euo pipefail
browser="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$browser" ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
"$browser" --version
