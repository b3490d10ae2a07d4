#!/usr/bin/env bash
# Build the example service images offline: a python3 base (pulled if a registry answers,
# else debootstrapped) and hms-ach / hms-frm / hms-notify / hms-crashloop on top of it.
# Idempotent: an existing base is kept and the service builds hit the Docker build cache.
#
# Env:
#   HMS_REQUIRE_DOCKER=1   fail (exit 1) instead of skipping (exit 0) when Docker is unavailable
#   HMS_SKIP_PULL=1        do not try `docker pull python:3.11-slim` first
#   HMS_REBUILD_BASE=1     rebuild hms-base:bookworm even if it exists (reuses the rootfs cache)
#   HMS_DEBIAN_MIRROR=URL  debootstrap mirror (default: from /etc/apt sources, else deb.debian.org)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BASE_IMAGE="hms-base:bookworm"
PULL_IMAGE="python:3.11-slim"
ROOTFS="$ROOT/var/cache/hms-base-rootfs"
DEFAULT_MIRROR="http://deb.debian.org/debian"
LABEL="hms.example=1"
# The image PATH docker import would otherwise leave empty, so `python3` resolves.
IMAGE_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log() { echo "[build_images] $*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

T_START="$(now)"

if ! docker info >/dev/null 2>&1; then
    log "Docker is not available (\`docker info\` failed): is dockerd running and is this user allowed to use it?"
    if [[ "${HMS_REQUIRE_DOCKER:-0}" == "1" ]]; then
        log "HMS_REQUIRE_DOCKER=1: failing"
        exit 1
    fi
    log "skipping image build (set HMS_REQUIRE_DOCKER=1 to make this an error)"
    exit 0
fi

# Without the buildx plugin, a modern docker CLI only works with the classic builder.
if ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
fi

mkdir -p "$ROOT/var/cache"
# Two engineers running this at once must not debootstrap into the same directory.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT/var/cache/hms-build-images.lock"
    flock 9
fi

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# First bookworm `deb` URI configured for apt on this host (a nearby or snapshot mirror beats the default).
apt_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        awk '$1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == "bookworm" && $i ~ /^(https?|file):/) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Types:/)   types = $i
                    if ($i ~ /^URIs:/)    uris = $i
                    if ($i ~ /^Suites:/)  suites = $i
                    if ($i ~ /^Enabled:/) enabled = tolower($i)
                }
                if (types ~ /[ \t]deb([ \t]|$)/ && suites ~ /[ \t]bookworm([ \t]|$)/ && enabled !~ /no/) {
                    split(uris, u, /[ \t]+/)
                    if (u[2] ~ /^(https?|file):/) { print u[2]; exit }
                }
            }' "$f"
    done
}

# Unmount whatever a killed debootstrap left mounted (proc, sys) before deleting its directory.
unmount_under() {
    local dir="$1" mp
    awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r mp; do
            log "unmounting leftover $mp"
            umount -l "$mp" || true
        done
}

build_base_from_debootstrap() {
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "debootstrap is not installed and no registry is reachable; install it with:"
        log "    apt-get install -y debootstrap"
        exit 1
    fi
    if [[ "$(id -u)" != "0" ]]; then
        log "debootstrap needs root; re-run as root (or sudo) to build $BASE_IMAGE"
        exit 1
    fi
    # debootstrap deletes $ROOTFS/debootstrap on success, so its presence marks an interrupted run.
    if [[ -x "$ROOTFS/usr/bin/python3" && ! -e "$ROOTFS/debootstrap" ]]; then
        log "reusing bootstrapped rootfs $ROOTFS"
    else
        local mirror="${HMS_DEBIAN_MIRROR:-}"
        if [[ -z "$mirror" ]]; then
            mirror="$(apt_mirror | head -n 1 || true)"
            mirror="${mirror:-$DEFAULT_MIRROR}"
        fi
        if [[ -e "$ROOTFS" ]]; then
            log "removing incomplete rootfs $ROOTFS"
            unmount_under "$ROOTFS"
            rm -rf --one-file-system "$ROOTFS"
        fi
        log "debootstrap --variant=minbase --include=python3 bookworm $ROOTFS $mirror"
        local t
        t="$(now)"
        debootstrap --variant=minbase --include=python3 bookworm "$ROOTFS" "$mirror"
        log "debootstrap done in $(since "$t") s"
    fi
    log "importing $ROOTFS as $BASE_IMAGE"
    local t
    t="$(now)"
    # Package caches and apt lists are dead weight in a runtime image.
    tar -C "$ROOTFS" --numeric-owner \
        --exclude='./var/cache/apt/archives/*.deb' \
        --exclude='./var/cache/apt/*.bin' \
        --exclude='./var/lib/apt/lists/*' \
        -c . |
        docker import \
            -c "ENV PATH=$IMAGE_PATH" \
            -c "LABEL $LABEL" \
            -c 'CMD ["python3"]' \
            -m "debootstrap minbase bookworm + python3" \
            - "$BASE_IMAGE" >/dev/null
    log "imported $BASE_IMAGE in $(since "$t") s"
}

ensure_base() {
    if image_exists "$BASE_IMAGE" && [[ "${HMS_REBUILD_BASE:-0}" != "1" ]]; then
        log "base image $BASE_IMAGE exists, skipping"
        return
    fi
    local t
    t="$(now)"
    if [[ "${HMS_SKIP_PULL:-0}" != "1" ]]; then
        log "trying: timeout 20 docker pull $PULL_IMAGE"
        if timeout 20 docker pull -q "$PULL_IMAGE" >/dev/null 2>&1; then
            docker tag "$PULL_IMAGE" "$BASE_IMAGE"
            log "tagged $PULL_IMAGE as $BASE_IMAGE ($(since "$t") s)"
            return
        fi
        log "pull failed (no registry reachable); building the base with debootstrap"
    fi
    build_base_from_debootstrap
    log "base image ready in $(since "$t") s"
}

# --network none: the services need nothing from the network at build time, and none exists here.
NETWORK_ARGS=(--network none)

# Output is kept back unless the build fails: the classic builder's deprecation banner is noise.
docker_build() {
    local out
    if out="$(docker build "${NETWORK_ARGS[@]}" "$@" 2>&1)"; then
        return 0
    fi
    if [[ ${#NETWORK_ARGS[@]} -gt 0 ]]; then
        log "build with --network none failed; retrying without it"
        NETWORK_ARGS=()
        if out="$(docker build "$@" 2>&1)"; then
            return 0
        fi
    fi
    printf '%s\n' "$out" >&2
    return 1
}

build_service() {
    local module="$1" version="$2"
    shift 2
    local tag_args=() tag
    for tag in "$@"; do tag_args+=(-t "$tag"); done
    log "building $* (services.$module, version $version)"
    local t
    t="$(now)"
    docker_build -q --label "$LABEL" \
        -f services/Dockerfile \
        --build-arg "BASE=$BASE_IMAGE" \
        --build-arg "SERVICE=$module" \
        --build-arg "VERSION=$version" \
        "${tag_args[@]}" services
    log "built $* in $(since "$t") s"
}

build_crashloop() {
    log "building hms-crashloop:1.0 (hms-ach:1.4 with HMS_EXIT_AT_START=3)"
    local t dir="$ROOT/var/cache/hms-crashloop"
    t="$(now)"
    # A context of its own: just a Dockerfile, so nothing else is sent to the daemon.
    mkdir -p "$dir"
    printf 'FROM hms-ach:1.4\nENV HMS_EXIT_AT_START=3\n' >"$dir/Dockerfile"
    docker_build -q --label "$LABEL" --label hms.crashloop=1 \
        -t hms-crashloop:1.0 -t registry.gov/hms-crashloop:1.0 "$dir"
    log "built hms-crashloop:1.0 in $(since "$t") s"
}

# The fast pod (nginx): the host's nginx binary on the base, whose libraries it already finds.
build_fastpod() {
    local nginx_bin
    nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
    if [[ ! -x "$nginx_bin" ]]; then
        log "nginx is not installed on this host: skipping hms-fast:1.0 (apt-get install -y nginx)"
        return 0
    fi
    log "building hms-fast:1.0 (nginx from $nginx_bin)"
    local t dir="$ROOT/var/cache/hms-fast"
    t="$(now)"
    mkdir -p "$dir"
    cp bench/fastpod/Dockerfile bench/fastpod/nginx.conf.in bench/fastpod/entrypoint.sh "$dir/"
    cp "$nginx_bin" "$dir/nginx"
    docker_build -q --label "$LABEL" --build-arg "BASE=$BASE_IMAGE" \
        -t hms-fast:1.0 -t registry.gov/hms-fast:1.0 "$dir"
    log "built hms-fast:1.0 in $(since "$t") s"
}

ensure_base
build_service hms_ach 1.4 hms-ach:1.4 registry.gov/hms-ach:1.4
build_service hms_ach 1.5 hms-ach:1.5 registry.gov/hms-ach:1.5  # the next release, for rolling updates
build_service hms_frm 1.0 hms-frm:1.0 registry.gov/hms-frm:1.0
build_service hms_notify 1.0 hms-notify:1.0 registry.gov/hms-notify:1.0
build_crashloop
build_fastpod
# A rebuilt base or changed code leaves the previous images untagged; only ours carry this label.
docker image prune -f --filter "label=$LABEL" >/dev/null

log "images:"
docker images --filter "label=$LABEL" --format '{{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' | sort | sed 's/^/    /'
log "done in $(since "$T_START") s"
