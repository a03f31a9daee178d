#!/usr/bin/env bash
# Print the path of a headless-capable Chromium for the report picture test, installing it if missing.
#
# Chromium comes from the system packages (Debian, as root); a browser that a pip
# package downloads at run time is not used. Progress goes to stderr; the only
# line on stdout is the browser's path, e.g.
#   export TENSAFE_TEST_CHROMIUM=$(scripts/chromium-for-tests.sh)
set -euo pipefail

if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "Chromium is not installed and this is not a Debian machine with root: install it yourself" >&2
        exit 1
    fi
    echo "installing Chromium from the system packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >&2 || { apt-get update -q >&2 && apt-get install -y -q chromium >&2; }
fi
command -v chromium
