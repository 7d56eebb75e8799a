#!/bin/sh
# Which Python the Makefile builds a venv with.
#
#   tools/find_python.sh          the newest python3.X (X >= 11) on PATH that actually runs, else
#                                 python3 when it is >= 3.11
#   tools/find_python.sh CMD      check CMD instead of searching (what `make PYTHON=CMD` names)
#   tools/find_python.sh --all    one line "3.X /path/to/python3.X" per supported minor version found
#                                 on PATH or in pyenv's versions/ (for `make test-versions`)
#
# The interpreter goes to stdout; when nothing fits, a message naming what was looked for and how to
# install one goes to stderr and the exit code is 2.
#
# Every candidate is run (`-c 'import sys; ...'`) rather than trusted by name: a pyenv shim such as
# ~/.pyenv/shims/python3.13 exists for every installed version but fails unless that version is
# active. Only shell built-ins are used, so this works on a PATH holding nothing but interpreters.

MIN_MINOR=11 # pyproject.toml: requires-python = ">=3.11"
MAX_MINOR=30 # the search runs from 3.30 down; bounded, and far beyond any released Python

# Print "3.N" for the interpreter $1, or nothing when it does not run.
probe() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

# True when $1 is "3.N" with N >= MIN_MINOR.
supported() {
    case $1 in
    3.*) minor=${1#3.} ;;
    *) return 1 ;;
    esac
    case $minor in
    '' | *[!0-9]*) return 1 ;;
    esac
    [ "$minor" -ge "$MIN_MINOR" ]
}

# Why an interpreter that reported version $1 (maybe nothing) is not used.
describe() {
    if [ -z "$1" ]; then
        echo "does not run (a pyenv shim for an inactive version?)"
    else
        echo "Python $1, too old"
    fi
}

# Set FOUND to the first python3.$1 in PATH order that runs and reports a supported version;
# note the ones that exist but do not qualify in REJECTED.
first_on_path() {
    FOUND=
    rest=$PATH:
    while [ -n "$rest" ]; do
        dir=${rest%%:*}
        rest=${rest#*:}
        [ -n "$dir" ] || dir=.
        cand=$dir/python3.$1
        [ -f "$cand" ] && [ -x "$cand" ] || continue
        version=$(probe "$cand")
        if supported "$version"; then
            FOUND=$cand
            return 0
        fi
        REJECTED="$REJECTED
    $cand: $(describe "$version")"
    done
    return 1
}

# --all: also look in pyenv's versions/ (its shims only run the active version).
first_in_pyenv() {
    FOUND=
    root=${PYENV_ROOT:-$HOME/.pyenv}
    for cand in "$root"/versions/3."$1".*/bin/python3."$1"; do
        [ -x "$cand" ] || continue
        if [ "$(probe "$cand")" = "3.$1" ]; then
            FOUND=$cand
            return 0
        fi
    done
    return 1
}

fail() {
    {
        echo "error: $1"
        echo "  tunneld needs Python 3.$MIN_MINOR or newer. Install one, e.g.:"
        echo "    Debian 12 / Ubuntu 24.04 and newer:  apt-get install python3 python3-venv"
        echo "    any Linux or macOS:                  uv python install 3.13   (or: pyenv install 3.13)"
        echo "  then run make again, or name it:       make test PYTHON=/path/to/python3.13"
    } >&2
    exit 2
}

if [ "$1" = --all ]; then
    minor=$MIN_MINOR
    any=
    while [ "$minor" -le "$MAX_MINOR" ]; do
        if first_on_path "$minor" || first_in_pyenv "$minor"; then
            echo "3.$minor $FOUND"
            any=1
        fi
        minor=$((minor + 1))
    done
    [ -n "$any" ] || fail "no python3.$MIN_MINOR..python3.$MAX_MINOR found on PATH or in pyenv"
    exit 0
fi

if [ -n "$1" ]; then
    version=$(probe "$1")
    [ -n "$version" ] || fail "PYTHON=$1 was not found or does not run"
    supported "$version" || fail "PYTHON=$1 is Python $version"
    echo "$1"
    exit 0
fi

REJECTED=
minor=$MAX_MINOR
while [ "$minor" -ge "$MIN_MINOR" ]; do
    if first_on_path "$minor"; then
        echo "$FOUND"
        exit 0
    fi
    minor=$((minor - 1))
done

version=$(probe python3)
if supported "$version"; then
    command -v python3
    exit 0
fi

# Nothing fits: say what is there, so "I do have python3.10" is visible.
[ -z "$version" ] || REJECTED="$REJECTED
    python3: $(describe "$version")"
rest=$PATH:
while [ -n "$rest" ]; do
    dir=${rest%%:*}
    rest=${rest#*:}
    for cand in "${dir:-.}"/python3.[0-9] "${dir:-.}"/python3.10; do
        [ -x "$cand" ] && REJECTED="$REJECTED
    $cand: $(describe "$(probe "$cand")")"
    done
done
fail "no Python >= 3.$MIN_MINOR found: looked on PATH for python3.$MAX_MINOR down to \
python3.$MIN_MINOR, then python3.${REJECTED:+
  found but not usable:$REJECTED}"
