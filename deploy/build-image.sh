#!/usr/bin/env bash
# Build the serving image: with docker where an engine answers, else with buildah (chroot
# isolation, vfs storage: works as root without a daemon or overlay support).
#   deploy/build-image.sh [-t TAG] [--gpu] [CONTEXT]      (defaults: cnnserve:latest, .)
# BASE_IMAGE picks the base (default debian:bookworm-slim). Under buildah with no BASE_IMAGE
# given, a local Debian base made by deploy/local-base.sh is used, so no registry is needed.
# Prints the image's size last.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tag=cnnserve:latest
variant=cpu
while [ $# -gt 0 ]; do
    case "$1" in
        -t) tag=$2; shift 2 ;;
        --gpu) variant=gpu; shift ;;
        -h | --help) sed -n '2,7p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
context=${1:-.}
BUILDAH=${BUILDAH:-buildah --storage-driver vfs}
args=(--build-arg "VARIANT=$variant")

if [ "${BUILDER:-}" != buildah ] && docker info >/dev/null 2>&1; then
    [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    docker build "${args[@]}" -t "$tag" "$context"
    size=$(docker image inspect -f '{{.Size}}' "$tag")
elif command -v buildah >/dev/null; then
    base=${BASE_IMAGE:-$("$here/local-base.sh")}
    args+=(--build-arg "BASE_IMAGE=$base")
    # pip inside the build trusts the host's CA bundle: mount the file alone (mounting all of
    # /etc/ssl/certs breaks the ca-certificates package inside).
    ca=/etc/ssl/certs/ca-certificates.crt
    [ -f "$ca" ] && args+=(-v "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
    # --format docker keeps the HEALTHCHECK; --layers reuses unchanged steps between builds.
    $BUILDAH bud --isolation chroot --format docker --layers "${args[@]}" -t "$tag" "$context"
    size=$($BUILDAH inspect --type image --format '{{.ImageSize}}' "$tag" 2>/dev/null || true)
    if ! [[ "$size" =~ ^[0-9]+$ ]]; then
        size=$($BUILDAH images --noheading --format '{{.Size}}' "$tag" | head -1)
    fi
else
    echo "no Docker engine and no buildah here: apt-get install buildah debootstrap" >&2
    exit 1
fi
if [[ "$size" =~ ^[0-9]+$ ]]; then
    echo "image $tag: $((size / 1000000)) MB"
else
    echo "image $tag: $size"
fi
