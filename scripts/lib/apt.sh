# shellcheck shell=bash
# Shared by the set-up scripts: install Debian packages.
#
#   apt_install TAG PACKAGE...
#
# Uses apt-get (through `sudo -n` when not root), first without refreshing the package
# lists (fast when they are current), then once more after `apt-get update`. Messages are
# prefixed with TAG (the calling script's name). Returns 1 with a message on failure.
apt_install() {
    local tag="$1"
    shift
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$tag: ERROR: apt-get not found, cannot install $*" >&2
        return 1
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "$tag: ERROR: not root and sudo not found, cannot install $*" >&2
            return 1
        fi
        sudo=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "$tag: installing $*"
    if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
        if ! "${sudo[@]}" apt-get update -qq; then
            echo "$tag: ERROR: apt-get update failed (is the package mirror reachable?)" >&2
            return 1
        fi
        if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@"; then
            echo "$tag: ERROR: apt-get install $* failed" >&2
            return 1
        fi
    fi
}
