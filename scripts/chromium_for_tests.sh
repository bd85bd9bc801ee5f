#!/usr/bin/env bash
# Installs Debian's chromium for the report's headless-browser test (tests/test_report_service.py),
# if it is missing. Run as root (CI images are). The test skips, saying why, when chromium is absent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium: $(command -v chromium) (already installed)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing and installing it needs root: sudo $0" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium fonts-dejavu-core
command -v chromium
