#!/usr/bin/env bash
# Optional Debian tools the tests use when present (a test that needs one skips with a
# reason otherwise). Installed only when we are root with apt; never fatal.
#   systemd-analyze  (package systemd)     unit verify / security score
#   promtool         (package prometheus)  extracted from the .deb into the venv's bin/, so
#                                          no Prometheus server is installed or started
#   wsclean          (package wsclean)     the image stage's primary imager (else tclean)
set -uo pipefail
VENV_BIN=${1:?usage: install-debian-tools.sh VENV_BIN}

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
updated=0
apt_update() {
    [ "$updated" = 1 ] && return 0
    apt-get update -qq >/dev/null 2>&1 && updated=1
}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if can_apt && apt_update && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1; then
        echo "installed systemd-analyze (Debian package systemd)"
    else
        echo "note: systemd-analyze not installed; the unit-file tests will skip"
    fi
fi

if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$VENV_BIN/promtool" ]; then
    tmp=$(mktemp -d)
    if can_apt && apt_update && (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) \
        && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" \
        && install -m 0755 "$tmp/x/usr/bin/promtool" "$VENV_BIN/promtool"; then
        echo "installed promtool into $VENV_BIN (from Debian package prometheus)"
    else
        echo "note: promtool not installed; the promtool tests will skip"
    fi
    rm -rf "$tmp"
fi
if ! command -v wsclean >/dev/null 2>&1; then
    if can_apt && apt_update && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends wsclean >/dev/null 2>&1; then
        echo "installed wsclean (Debian package wsclean)"
    else
        echo "note: wsclean not installed; images are made with tclean (slower)"
    fi
fi
exit 0
