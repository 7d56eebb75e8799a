#!/bin/sh
# Build the example image (Dockerfile here) without a Docker daemon and without Docker Hub:
# buildah builds the Dockerfile as it is, on a local base instead of python:3.11-slim, a Debian
# bookworm root with python3 (3.11) made by mmdebstrap from a Debian mirror. `make sandbox-image`
# runs this script, and tests/agent/test_sandbox_image.py runs it and then the image, with podman.
#
#   sh deploy/sandbox-image/build-local.sh [CONTEXT]
#
# CONTEXT is the build context (default: the repository root); it holds dist/tunnel-agent.pyz
# (`make agent AGENT_BUILD=pyz`) and deploy/sandbox-image/. Settings, from the environment:
#   SANDBOX_IMAGE       the image's name (default localhost/sandbox-with-agent:latest)
#   SANDBOX_STORE       buildah's and podman's storage (default build/sandbox-image/storage):
#                       podman --root $SANDBOX_STORE/root --runroot $SANDBOX_STORE/run
#   SANDBOX_STORAGE_DRIVER  its driver: overlay (default) or vfs where overlayfs is not available
#                       (several times slower: it copies every layer); one store, one driver
#   SANDBOX_CACHE       where the base's root tarball is kept, named by a hash of what makes it
#                       (default build/sandbox-image/cache); a second build reuses it
#   SANDBOX_MIRROR      the Debian mirror (default: the one apt uses for bookworm here, else
#                       http://deb.debian.org/debian)
#   SANDBOX_BASE_IMAGE  build on this image instead (e.g. python:3.11-slim where a registry is
#                       reachable); no local base is made then
# Runs as root (mmdebstrap --mode=root, buildah with --isolation chroot). Prints the image's name.
# The base is imported with podman (`podman import`: one pass over the tarball).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
context=${1:-$root}
image=${SANDBOX_IMAGE:-localhost/sandbox-with-agent:latest}
store=${SANDBOX_STORE:-$root/build/sandbox-image/storage}
cache=${SANDBOX_CACHE:-$root/build/sandbox-image/cache}
driver=${SANDBOX_STORAGE_DRIVER:-overlay}

for tool in buildah podman mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "build-local.sh: $tool is missing (apt-get install buildah podman mmdebstrap, or make ensure-test-tools)" >&2
        exit 2
    }
done
[ -f "$context/dist/tunnel-agent.pyz" ] || {
    echo "build-local.sh: no $context/dist/tunnel-agent.pyz (make agent AGENT_BUILD=pyz)" >&2
    exit 2
}

buildah() {
    command buildah --root "$store/root" --runroot "$store/run" --storage-driver "$driver" "$@"
}
podman() {
    command podman --root "$store/root" --runroot "$store/run" --storage-driver "$driver" "$@"
}

# The mirror apt uses for Debian bookworm on this machine (deb822 .sources or one-line lists).
apt_mirror() {
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk '
            /^[ \t]*#/ { next }
            /^deb[ \t]/ {  # one-line format: deb [options] URI SUITE COMPONENTS
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == "bookworm") { print $i; exit }
                next
            }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (j = 2; j <= NF; j++) if ($j == "bookworm") found = 1 }
            /^[ \t]*$/ { if (found && uri != "") { print uri; exit } uri = ""; found = 0 }
            END { if (found && uri != "") print uri }
        ' "$f" | head -n 1
    done | head -n 1
}

if [ -n "${SANDBOX_BASE_IMAGE:-}" ]; then
    base=$SANDBOX_BASE_IMAGE
else
    mirror=${SANDBOX_MIRROR:-$(apt_mirror)}
    mirror=${mirror:-http://deb.debian.org/debian}
    # The root: Debian's python3 (3.11), passwd (useradd), coreutils and dash, and what they
    # depend on. extract (default): the packages unpacked, no maintainer script run, then
    # /etc/passwd and /etc/group from base-passwd and ld.so.cache, the little a container needs
    # (about 20 s here, where a configured minbase root takes 40 s idle and 2 min under load:
    # dpkg). minbase: a configured Debian system (`SANDBOX_BASE_VARIANT=minbase`). Like the slim
    # images, no documentation, manual pages or translations.
    set -- --quiet --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
    case ${SANDBOX_BASE_VARIANT:-extract} in
    extract)
        set -- "$@" --variant=extract \
            --include=python3,passwd,login,coreutils,dash,base-files,base-passwd,libc-bin \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
            --extract-hook='cp "$1/usr/share/base-passwd/passwd.master" "$1/etc/passwd"' \
            --extract-hook='cp "$1/usr/share/base-passwd/group.master" "$1/etc/group"' \
            --extract-hook='chroot "$1" /sbin/ldconfig'
        ;;
    minbase) set -- "$@" --variant=minbase --include=python3 ;;
    *)
        echo "build-local.sh: SANDBOX_BASE_VARIANT is extract or minbase" >&2
        exit 2
        ;;
    esac
    set -- "$@" bookworm
    # What makes the root, whose hash names the cached tarball and the base image.
    recipe="mmdebstrap $(mmdebstrap --version | awk '{print $2}') $* $mirror"
    key=$(printf '%s\n' "$recipe" | sha256sum | cut -c1-16)
    tarball=$cache/bookworm-python3-$key.tar
    base=localhost/tunneld-sandbox-base:$key
    if [ ! -f "$tarball" ]; then
        mkdir -p "$cache"
        echo "build-local.sh: making the base root (${SANDBOX_BASE_VARIANT:-extract}) ..." >&2
        # Made under a name of this process's own, then renamed: two builds at once never
        # read each other's half-written tarball.
        part=$tarball.$$.part
        if ! mmdebstrap "$@" "$part.tar" "$mirror" >"$part.log" 2>&1; then
            cat "$part.log" >&2
            rm -f "$part.tar" "$part.log"
            exit 1
        fi
        mv "$part.tar" "$tarball"
        rm -f "$part.log"
    fi
    if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
        echo "build-local.sh: importing $tarball as $base ..." >&2
        podman import --quiet --change 'CMD ["/bin/sh"]' \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            "$tarball" "$base" >/dev/null
    fi
fi

echo "build-local.sh: building $image on $base ..." >&2
buildah bud --quiet --isolation chroot --network host \
    -f "$context/deploy/sandbox-image/Dockerfile" --build-arg "BASE_IMAGE=$base" \
    -t "$image" "$context" >/dev/null
echo "$image"
