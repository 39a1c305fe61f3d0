#!/usr/bin/env bash
# Run `.ci/run` on a bare Debian 12 (bookworm): a debootstrap minbase root with nothing but
# python3, entered with chroot as root. This is what issue 14 asks for ("a fresh Debian 12
# machine with nothing but python3 and root"): every other package must come from .ci/run.
#
#   sudo benchmarks/ci_on_bare_debian.sh [COMMAND...]
#
# The root is $SPROUT_BARE_ROOT (default /srv/sprout-bare), made anew each time: it must not
# exist, or hold an earlier run of this script. The repository's HEAD is cloned into ROOT/ci
# (commit first), and COMMAND runs there. COMMAND
# defaults to `CI=true PYTEST_ADDOPTS=--durations=60 bash .ci/run`; the script prints the
# wall time of the setup (debootstrap) and of COMMAND, and exits with COMMAND's status.
#
# What the root shares with this machine, as any machine of a site has: /proc, /sys (with
# its cgroups), /dev; the site's network settings (resolv.conf, apt sources and options, the
# TLS proxy's CA certificates in /usr/local/share/ca-certificates, which ca-certificates adds to
# the bundle once .ci/run installs it); pip's configuration files and PIP_* and *_CA_BUNDLE
# variables, and /opt (read-only) where a local package mirror lives. Needs: root, debootstrap.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${SPROUT_BARE_ROOT:-/srv/sprout-bare}"
CMD=("$@")
[ ${#CMD[@]} -gt 0 ] || CMD=(bash -c "CI=true PYTEST_ADDOPTS=--durations=60 bash .ci/run")
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

[ "$(id -u)" = 0 ] || { echo "bare: run as root (chroot, mount)"; exit 2; }
command -v debootstrap >/dev/null || { echo "bare: needs debootstrap (apt-get install debootstrap)"; exit 2; }
if [ -e "$ROOT" ] && [ ! -e "$ROOT/.sprout-bare" ]; then
  echo "bare: $ROOT exists and was not made by this script; set another SPROUT_BARE_ROOT"; exit 2
fi

unmount() { for m in proc sys dev opt; do umount -R "$ROOT/$m" 2>/dev/null || true; done; }
if [ -e "$ROOT" ]; then
  unmount
  # never delete through a mount (/opt and /dev are bound into the root while it runs)
  if awk -v r="$ROOT/" 'index($2, r) == 1 {found = 1} END {exit !found}' /proc/mounts; then
    echo "bare: something is still mounted under $ROOT; unmount it first"; exit 1
  fi
  rm -rf --one-file-system "$ROOT"
fi
trap unmount EXIT

t0=$(date +%s)
debootstrap --variant=minbase --include=python3 bookworm "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
  || { echo "bare: debootstrap failed; see $ROOT.debootstrap.log"; exit 1; }
touch "$ROOT/.sprout-bare"
git clone -q "$REPO" "$ROOT/ci"

mount -t proc proc "$ROOT/proc"
mount --rbind /sys "$ROOT/sys"
mount --rbind /dev "$ROOT/dev"
if [ -d /opt ]; then mkdir -p "$ROOT/opt"; mount --bind /opt "$ROOT/opt"; mount -o remount,bind,ro "$ROOT/opt"; fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  cp /etc/apt/sources.list.d/debian.sources "$ROOT/etc/apt/sources.list.d/"; rm -f "$ROOT/etc/apt/sources.list"
fi
cp /etc/apt/apt.conf.d/* "$ROOT/etc/apt/apt.conf.d/" 2>/dev/null || true
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$ROOT/usr/local/share/ca-certificates"; cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt /root/.config/pip/pip.conf /root/.pip/pip.conf; do
  if [ -f "$f" ]; then mkdir -p "$ROOT$(dirname "$f")"; cp "$f" "$ROOT$f"; fi
done
envs=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
while IFS='=' read -r k v; do
  case "$k" in PIP_*|*_CA_BUNDLE|SSL_CERT_FILE|SSL_CERT_DIR|GIT_SSL_CAINFO) envs+=("$k=$v") ;; esac
done < <(env)
t1=$(date +%s)
echo "bare: $ROOT ready in $((t1 - t0)) s (debootstrap minbase bookworm + python3: $(chroot "$ROOT" python3 --version 2>&1))"

set +e
chroot "$ROOT" /usr/bin/env -i "${envs[@]}" bash -c 'cd /ci && "$@"' bash "${CMD[@]}"
rc=$?
set -e
t2=$(date +%s)
echo "bare: command exited $rc after $((t2 - t1)) s ($(( (t2 - t1) / 60 )) min $(( (t2 - t1) % 60 )) s)"
exit $rc
