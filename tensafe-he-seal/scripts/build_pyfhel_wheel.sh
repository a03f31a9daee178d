#!/usr/bin/env bash
# Build (once) and cache a Pyfhel wheel that needs no network beyond the package registry.
#
# Pyfhel ships only as an sdist, and its bundled SEAL build downloads three
# optional components (Microsoft GSL, zlib, Zstandard) at configure time. This
# script downloads the pinned sdist, checks its SHA-256, switches those three
# options OFF in its pyproject.toml and builds a wheel (about 6 minutes on 2
# cores). The wheel is cached, so later runs take it in a second.
#
# Usage: build_pyfhel_wheel.sh [PYTHON]      prints the cache directory holding the wheel
# Cache: $TENSAFE_WHEEL_CACHE, default ~/.cache/tensafe/wheels
set -euo pipefail

PYTHON="${1:-python3}"
VERSION="3.5.0"
SHA256="0375b83b5a83026924f59db25c4efa9f27e1e8a66d004658f4d24195986a04b6"
CACHE="${TENSAFE_WHEEL_CACHE:-$HOME/.cache/tensafe/wheels}"
TAG="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"

mkdir -p "$CACHE"
if compgen -G "$CACHE/pyfhel-$VERSION-$TAG-*.whl" > /dev/null; then
    echo "$CACHE"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "building Pyfhel $VERSION for $TAG (about 6 minutes on 2 cores) ..." >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary pyfhel "pyfhel==$VERSION" -d "$WORK" >&2
echo "$SHA256  $WORK/pyfhel-$VERSION.tar.gz" | sha256sum --check --quiet
tar -xzf "$WORK/pyfhel-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/pyfhel-$VERSION"
for option in SEAL_USE_MSGSL SEAL_USE_ZLIB SEAL_USE_ZSTD; do
    sed -i -E "s/^([[:space:]]*$option[[:space:]]*=[[:space:]]*)'ON'/\1'OFF'/" "$SRC/pyproject.toml"
    grep -Eq "^[[:space:]]*$option[[:space:]]*=[[:space:]]*'OFF'" "$SRC/pyproject.toml" \
        || { echo "could not switch $option off in Pyfhel's pyproject.toml" >&2; exit 1; }
done
"$PYTHON" -m pip wheel --quiet --no-deps "$SRC" -w "$WORK/dist" >&2
mv "$WORK"/dist/pyfhel-*.whl "$CACHE/"
echo "$CACHE"
