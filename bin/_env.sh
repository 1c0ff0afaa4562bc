# Shared by bin/dev, bin/test and bin/bench: install what mailroom needs from nothing.
# Debian packages come from apt (only those missing; apt-get update once), Python packages
# into ./.venv under constraints.txt (the versions Debian 13 ships).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAILROOM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

ensure_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # Servers installed as test peers or benchmark anchors (Dovecot, Postfix) must not start
    # on the machine's own ports: policy-rc.d forbids starting services during the install.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && made_policy=1
    fi
    local status=0
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || status=$?
    [ -z "$made_policy" ] || $sudo rm -f "$policy"
    return $status
}

ensure_venv() {  # ensure_venv EXTRAS  (e.g. "" or "[test]")
    local extras="${1:-}" hash stamp
    hash="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
    stamp="$hash$extras"
    if [ -f "$VENV/.mailroom-stamp" ]; then
        local have
        have="$(cat "$VENV/.mailroom-stamp")"
        # a venv with the test extras also serves bin/dev
        if [ "$have" = "$stamp" ] || { [ -z "$extras" ] && [ "${have#"$hash"}" != "$have" ]; }; then
            return 0
        fi
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    echo "installing Python packages into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT$extras" \
        2> >(grep -v "is ignored: it is neither" >&2)
    echo "$stamp" > "$VENV/.mailroom-stamp"
}

# What building and running mailroom needs (systemd-python compiles against libsystemd).
BASE_APT=(libsystemd-dev pkg-config gcc openssl python3-venv python3-dev publicsuffix)
