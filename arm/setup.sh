#!/usr/bin/env bash
# Build the emulated board once: an arm64 Debian 12 root with Python 3.11 (debootstrap, unpacked
# without running anything arm64) and the runtime's aarch64 wheels fetched by the host's pip.
# Run by arm/run_tests.sh; arm/python then runs that Python as a Cortex-A72 under qemu-user.
# Recipe: DESIGN.md §5. Needs root on an x86-64 Debian/Ubuntu host, network to the Debian mirror
# and PyPI. Cached in $HERMES_ARM_CACHE (default ~/.cache/hermes-ort-arm); rebuilt only when the
# recipe or the pinned versions change.
#
#   HOST_PY=.venv/bin/python arm/setup.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache=${HERMES_ARM_CACHE:-${HOME:-/root}/.cache/hermes-ort-arm}
host_py=${HOST_PY:-$repo/.venv/bin/python}
mirror=${HERMES_ARM_MIRROR:-http://deb.debian.org/debian}
suite=bookworm # Debian 12: Python 3.11, glibc 2.36

die() {
    echo "arm/setup.sh: $*" >&2
    exit 1
}

# -- the host ---------------------------------------------------------------------------------
[ "$(uname -s) $(uname -m)" = "Linux x86_64" ] || die "expects an x86-64 Linux host, not $(uname -sm)"
[ "$(id -u)" = 0 ] || die "needs root (apt-get, debootstrap, and 'unshare -m' + 'mount --bind' to
  put an ARM /proc/cpuinfo in front of the emulated onnxruntime); run it as root, e.g. sudo make test-arm"
[ -x "$host_py" ] || die "no host Python at $host_py (its pip fetches the aarch64 wheels): run 'make setup'"
mkdir -p "$cache"

missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v unshare >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    echo "== installing ${missing[*]} (apt-get)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${missing[@]}"; } >"$cache/apt.log" 2>&1 ||
        die "apt-get could not install ${missing[*]}; see $cache/apt.log"
fi
command -v qemu-aarch64-static >/dev/null || die "no qemu-aarch64-static after installing qemu-user-static"

# onnxruntime segfaults under qemu-user when /proc/cpuinfo shows the x86 host: we must be allowed
# to bind an ARM one over it in a private mount namespace (a container needs CAP_SYS_ADMIN)
if ! err=$(unshare -m sh -c "mount --bind '$here/fake_cpuinfo' /proc/cpuinfo &&
        grep -q '^CPU part.*0xd08' /proc/cpuinfo" 2>&1); then
    die "cannot bind an ARM /proc/cpuinfo in a private mount namespace (unshare -m / mount --bind
  not permitted here${err:+: $err}); in a container this needs CAP_SYS_ADMIN (docker run --privileged)"
fi

# -- the arm64 root -----------------------------------------------------------------------------
root_recipe="debootstrap --arch=arm64 --foreign --variant=minbase --include=python3.11,libpython3.11-stdlib $suite"
if [ "$(cat "$cache/root.stamp" 2>/dev/null)" != "$root_recipe" ] || [ ! -x "$cache/root/usr/bin/python3.11" ]; then
    echo "== arm64 Debian $suite root with Python 3.11 (debootstrap, first time only)"
    rm -rf "$cache/root.tmp" "$cache/root.stamp"
    # shellcheck disable=SC2086  # the recipe is words
    $root_recipe "$cache/root.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
        die "debootstrap failed (network to $mirror?); last lines of $cache/debootstrap.log:
$(tail -5 "$cache/debootstrap.log")"
    # --foreign only downloads the included packages (their maintainer scripts would need arm64
    # to run); unpacking them is all the runtime needs
    for deb in "$cache"/root.tmp/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$cache/root.tmp" || die "cannot unpack $deb"
    done
    rm -f "$cache"/root.tmp/var/cache/apt/archives/*.deb
    [ -x "$cache/root.tmp/usr/bin/python3.11" ] || die "debootstrap gave no usr/bin/python3.11"
    rm -rf "$cache/root"
    mv "$cache/root.tmp" "$cache/root"
    echo "$root_recipe" >"$cache/root.stamp"
fi

# -- the aarch64 wheels -------------------------------------------------------------------------
# The board runs the versions the host runs, so both sides compute with the same onnxruntime.
pins=$("$host_py" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("onnxruntime", "numpy", "psutil", "pytest")))
EOF
) || die "cannot read the host's onnxruntime/numpy/psutil/pytest versions from $host_py"
pins=${HERMES_ARM_PACKAGES:-$pins}
pip_recipe="--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp --only-binary=:all:"
if [ "$(cat "$cache/site.stamp" 2>/dev/null)" != "$pip_recipe $pins" ] || [ ! -d "$cache/site" ]; then
    echo "== aarch64 wheels: $pins"
    rm -rf "$cache/site.tmp" "$cache/site.stamp"
    # shellcheck disable=SC2086
    "$host_py" -m pip install -q --disable-pip-version-check $pip_recipe --target "$cache/site.tmp" \
        $pins >"$cache/pip.log" 2>&1 ||
        die "pip could not fetch aarch64 wheels of $pins; see $cache/pip.log"
    rm -rf "$cache/site" "$cache/pycache"
    mv "$cache/site.tmp" "$cache/site"
    echo "$pip_recipe $pins" >"$cache/site.stamp"
fi

# -- does the board start? ----------------------------------------------------------------------
probe='import platform, sys, numpy, onnxruntime as ort, psutil
print(f"board: {platform.machine()}, Python {platform.python_version()}, glibc {platform.libc_ver()[1]}, "
      f"onnxruntime {ort.__version__} {ort.get_available_providers()}, numpy {numpy.__version__}, psutil {psutil.__version__}")'
HERMES_ARM_CACHE=$cache "$here/python" -c "$probe" ||
    die "the emulated Python (qemu-aarch64-static -cpu cortex-a72) failed to import the runtime's wheels"
for dist in "$cache"/site/{onnxruntime,numpy,psutil}-*.dist-info; do
    echo "  wheel $(basename "$dist" .dist-info): $(sed -n 's/^Tag: //p' "$dist/WHEEL" | paste -sd' ')"
done
