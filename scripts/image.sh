#!/usr/bin/env bash
# Build the gateway image with podman from Debian's packages and PyPI's wheels only, the way the
# suite does (tests/deploy/test_image.py) and an air-gapped user can: no image registry, no
# package index inside the build.
#
#   1. podman, runc, debootstrap and CNI's dnsname plugin (apt-get, as root);
#   2. the base image $BASE_IMAGE, once: Debian 12 (minbase) from $MIRROR with debootstrap,
#      imported with `podman import`, its updates applied; kept while `podman image exists`
#      says so (`podman rmi` it to make it anew, with the updates of the day);
#   3. the wheelhouse build/wheelhouse/: every distribution requirements/runtime.lock pins, as
#      the CPython 3.11 manylinux x86_64 wheel, checked against the lock's hashes (downloaded
#      with `pip download`, or with --offline only checked: a wheelhouse brought from elsewhere);
#   4. `podman build` of the Dockerfile on that base with WHEELS set, tagged $IMAGE.
#
# Options: --offline (no index: the wheelhouse must be complete), --base-only (steps 1-2).
# Exit status: 0 built, 3 podman cannot run a container here, other: failed.
# Environment: IMAGE (localhost/inference-gateway:test), BASE_IMAGE
# (localhost/gateway-base:bookworm), MIRROR (http://deb.debian.org/debian: the base's packages
# and its apt sources; SECURITY_MIRROR beside it, "" for none), PYTHON (the Python whose pip
# downloads: .venv/bin/python, else python3).
#
# podman runs with runc (crun refuses hosts with hybrid cgroup v1/v2) and explicit rlimits (its
# defaults exceed what some hosts allow): run the image with the same options,
#   podman --runtime runc run --ulimit nofile=16384:16384 --ulimit nproc=4096:4096 ...
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-localhost/inference-gateway:test}
BASE_IMAGE=${BASE_IMAGE:-localhost/gateway-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
if [[ -z ${SECURITY_MIRROR+set} ]]; then  # beside a mirror of Debian's layout; "" for none
    SECURITY_MIRROR=$([[ $MIRROR == */debian ]] && echo "${MIRROR%/debian}/debian-security" || true)
fi
LOCK=$ROOT/requirements/runtime.lock
WHEELHOUSE=$ROOT/build/wheelhouse
PODMAN=(podman --runtime runc)
ULIMITS=(--ulimit nofile=16384:16384 --ulimit nproc=4096:4096)

offline=0 base_only=0
for arg in "$@"; do
    case $arg in
        --offline) offline=1 ;;
        --base-only) base_only=1 ;;
        -h|--help) sed -n '2,/^set -e/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) echo "image.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

step() { printf '[image.sh] %s\n' "$*" >&2; }
scratch=() containers=() images=()  # removed on exit
cleanup() {
    rm -rf "${scratch[@]}"
    [[ ${#containers[@]} -eq 0 ]] || "${PODMAN[@]}" rm --force "${containers[@]}" >/dev/null 2>&1 || true
    [[ ${#images[@]} -eq 0 ]] || "${PODMAN[@]}" rmi "${images[@]}" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# -- 1. tools --------------------------------------------------------------------------------
"$ROOT/scripts/ensure-tools.sh" podman runc debootstrap
# Containers on a compose network find each other by service name: with podman's CNI backend
# (Debian 12's default) that takes the dnsname plugin.
if [[ $(podman info --format '{{.Host.NetworkBackend}}') == cni && ! -x /usr/lib/cni/dnsname ]]
then
    [[ $(id -u) -eq 0 ]] || { echo "missing: the CNI dnsname plugin. Install with: sudo" \
        "apt-get install golang-github-containernetworking-plugin-dnsname" >&2; exit 1; }
    step "installing the CNI dnsname plugin with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        golang-github-containernetworking-plugin-dnsname >/dev/null
fi

# -- 2. the base -----------------------------------------------------------------------------
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    step "base $BASE_IMAGE: present"
else
    step "base $BASE_IMAGE: debootstrap bookworm (minbase) from $MIRROR"
    rootfs=$(mktemp -d /var/tmp/gateway-base.XXXXXX)
    scratch+=("$rootfs" "$rootfs.log")
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; exit 1; }
    {
        echo "deb $MIRROR bookworm main"
        echo "deb $MIRROR bookworm-updates main"
        [[ -z $SECURITY_MIRROR ]] || echo "deb $SECURITY_MIRROR bookworm-security main"
    } >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # Imported under a name of its own; $BASE_IMAGE only once its updates are in.
    fresh="localhost/gateway-base-debootstrap:$$"
    upgrade="gateway-base-upgrade-$$"
    containers+=("$upgrade")
    images+=("$fresh")
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$fresh" >/dev/null
    if ! probe=$("${PODMAN[@]}" run --rm "${ULIMITS[@]}" "$fresh" true 2>&1); then
        echo "podman cannot run a container on this machine: $probe" >&2
        exit 3
    fi
    # The release's packages, then its updates (security ones included) as of today.
    "${PODMAN[@]}" run "${ULIMITS[@]}" --name "$upgrade" "$fresh" sh -c \
        'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq \
         && apt-get clean && rm -rf /var/lib/apt/lists/*' >/dev/null
    "${PODMAN[@]}" commit --quiet --change 'CMD ["bash"]' "$upgrade" "$BASE_IMAGE" >/dev/null
fi
[[ $base_only -eq 1 ]] && exit 0

# -- 3. the wheelhouse -----------------------------------------------------------------------
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
# Every pinned distribution, whatever its markers say on this host: the image's Python decides
# (Debian's 3.11.2 needs async-timeout, which `python_full_version < '3.11.3'` leaves out here).
unmarked=$(mktemp)
scratch+=("$unmarked")
sed -E 's/^([A-Za-z0-9._-]+==[^ ;]+) *;[^\\]*\\$/\1 \\/' "$LOCK" >"$unmarked"
platforms=()
for glibc in $(seq 36 -1 5); do  # bookworm's glibc is 2.36
    platforms+=(--platform "manylinux_2_${glibc}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
            --platform manylinux1_x86_64)
mkdir -p "$WHEELHOUSE"
shopt -s nullglob
stamp=$WHEELHOUSE/.lock.sha256  # the lock it was last made from (not in the build context)
wheels=("$WHEELHOUSE"/*.whl)
pins=$(grep -c '^[A-Za-z0-9._-]*==' "$LOCK")
if [[ $offline -eq 0 && -f $stamp && $(sha256sum <"$LOCK") == "$(cat "$stamp")" \
      && ${#wheels[@]} -eq $pins ]]; then
    step "wheelhouse: $WHEELHOUSE made from this lock"
else
    if [[ $offline -eq 1 ]]; then
        # No index, into a scratch directory: pip proves each wheel is there with its hash.
        step "wheelhouse: checking $WHEELHOUSE against the lock (no index)"
        into=$(mktemp -d)
        scratch+=("$into")
        where=(--no-index --find-links "$WHEELHOUSE" -d "$into")
    else
        step "wheelhouse: $WHEELHOUSE from the lock"
        where=(-d "$WHEELHOUSE")  # a wheel already there with the right hash is kept
    fi
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
        "${platforms[@]}" "${where[@]}" -r "$unmarked"
    sha256sum <"$LOCK" >"$stamp"
fi
# Wheels the lock does not name go, so the build context holds exactly the locked ones.
for wheel in "$WHEELHOUSE"/*; do
    sum=$(sha256sum "$wheel" | cut -d' ' -f1)
    grep -q -- "--hash=sha256:$sum" "$LOCK" || { step "removing $wheel (not in the lock)"; rm -f "$wheel"; }
done

# -- 4. the image ----------------------------------------------------------------------------
step "building $IMAGE on $BASE_IMAGE"
"${PODMAN[@]}" build "${ULIMITS[@]}" --pull=never --layers --format docker \
    --build-arg "BASE=$BASE_IMAGE" --build-arg WHEELS=1 \
    --tag "$IMAGE" --file "$ROOT/Dockerfile" "$ROOT"
step "built $IMAGE"
