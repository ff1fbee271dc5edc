# shellcheck shell=bash
# Sourced, not run: the Debian packages a script needs on the host.
#
# need_packages PKG...  returns 0 once every PKG is installed. Missing ones are installed
# with apt-get when running as root; otherwise it fails, naming them and the command.
# It writes to stderr only, so callers' standard output stays theirs to parse.
need_packages() {
    local p missing=()
    if ! command -v dpkg-query >/dev/null; then
        echo "$0: needs the Debian packages $*, and this host has no dpkg" >&2
        return 1
    fi
    for p in "$@"; do
        # Not `dpkg -s`: it also succeeds for a removed package whose config files remain.
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if [ "$(id -u)" != 0 ]; then
        echo "$0: missing Debian packages: ${missing[*]}" >&2
        echo "$0: install them as root: apt-get update && apt-get install -y ${missing[*]}" >&2
        return 1
    fi
    echo "$0: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}
