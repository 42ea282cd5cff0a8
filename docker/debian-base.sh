#!/usr/bin/env bash
# A base image for docker/Dockerfile made from Debian packages alone, for machines that reach a
# Debian mirror but no image registry. Needs root, debootstrap and a Docker engine.
#
#   docker/debian-base.sh [TAG] [SUITE] [MIRROR]     # default: colm-base:bookworm bookworm deb.debian.org
#
# The image holds a minimal Debian with python3, its venv module and the CA certificates; the
# Dockerfile installs everything else into a virtual environment. Bookworm's Python is 3.11, the
# version the CPU torch wheels of the public index are built for as well.
set -euo pipefail

tag=${1:-colm-base:bookworm}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

# What it needs, said before the minutes of debootstrap: one line each, with how to get it.
need=()
(( EUID == 0 )) || need+=("root: debootstrap and its chroot need it (run with sudo, or as root)")
command -v debootstrap >/dev/null || need+=("debootstrap: apt-get install debootstrap")
if ! command -v "${docker%% *}" >/dev/null; then
    need+=("a docker CLI: apt-get install docker.io (Debian and Ubuntu), or set DOCKER=/path/to/docker")
elif ! err=$($docker version --format '{{.Server.Version}}' 2>&1 >/dev/null); then
    need+=("a Docker engine ($(tail -n 1 <<< "$err")): start it (as root: systemctl start docker, or dockerd &)")
fi
if (( ${#need[@]} )); then
    printf 'debian-base.sh: missing %s\n' "${need[@]}" >&2
    exit 1
fi

root=$(mktemp -d /var/tmp/colm-base.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . \
    | $docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        - "$tag"
$docker run --rm "$tag" python3 -c 'import sys, venv; print("base image ready:", sys.version.split()[0])'
