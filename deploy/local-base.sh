#!/usr/bin/env bash
# Make a local Debian base image for buildah where no registry base image can be pulled:
# debootstrap a minbase bookworm, trim what a slim image leaves out, import it as
#   localhost/debian:bookworm-minbase
# The tarball is cached (CNNSERVE_BASE_CACHE, default /var/tmp/cnnserve-base), so only the first
# run pays for debootstrap. Needs root, debootstrap and buildah. Prints the image name.
set -euo pipefail

IMAGE=${IMAGE:-localhost/debian:bookworm-minbase}
CACHE=${CNNSERVE_BASE_CACHE:-/var/tmp/cnnserve-base}
TARBALL="$CACHE/bookworm-minbase.tar"
BUILDAH=${BUILDAH:-buildah --storage-driver vfs}

if $BUILDAH inspect --type image "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi

if [ ! -s "$TARBALL" ]; then
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >&2
    # What debian:bookworm-slim leaves out: downloaded .debs, apt lists, docs, man pages, locales.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
    find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    tar -C "$rootfs" --numeric-owner -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
fi

container=$($BUILDAH from scratch)
$BUILDAH add "$container" "$TARBALL" / >/dev/null
$BUILDAH config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$container"
$BUILDAH commit --quiet --rm "$container" "$IMAGE" >/dev/null
echo "$IMAGE"
