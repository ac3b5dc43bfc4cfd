# Shared helpers for packaging/test-packages.sh and packaging/system-test.sh (sourced).

CACHE_DIR="${MCP_TUNNEL_CI_CACHE:-/var/cache/mcp-tunnel-ci}"
ROOT_PACKAGES="systemd,dbus,procps,curl,ca-certificates"
ROOT_CACHE="$CACHE_DIR/bookworm-root"

step() { printf '\n=== %s\n' "$*"; }
pass() { printf 'PASS %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || fail "$1 not found (apt-get install -y $2)"; }

# in_lo_netns CMD...: runs CMD in a new network namespace whose only interface is lo (up).
# Every run of the real cloudflared, even `--version`, happens there: offline it dials public
# addresses by itself. cargo stays offline there (build first, on the host network).
in_lo_netns() {
  unshare -n env CARGO_NET_OFFLINE=true bash -c '
    ip link set lo up || exit 1
    if ip -o link show | grep -qv ": lo:"; then
      echo "refusing to run: this network namespace has interfaces other than lo" >&2; exit 1
    fi
    exec "$@"' in_lo_netns "$@"
}

# A Debian 12 minbase root with systemd, cached between runs: ~30-70 s the first time, then
# reused while the package list in the stamp file is unchanged. Only ever used as the lower
# layer of an overlay (or copied), never modified.
ensure_root() {
  need debootstrap debootstrap
  if [[ -d "$ROOT_CACHE" && "$(cat "$ROOT_CACHE.stamp" 2>/dev/null)" == "$ROOT_PACKAGES" ]]; then
    echo "using the cached Debian 12 root $ROOT_CACHE"
    return
  fi
  step "debootstrap a Debian 12 root into $ROOT_CACHE (cached for the next runs)"
  mkdir -p "$CACHE_DIR"
  rm -rf "$ROOT_CACHE" "$ROOT_CACHE.tmp"
  debootstrap --variant=minbase --include="$ROOT_PACKAGES" bookworm "$ROOT_CACHE.tmp" \
    http://deb.debian.org/debian >"$CACHE_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE_DIR/debootstrap.log" >&2; fail "debootstrap (log: $CACHE_DIR/debootstrap.log)"; }
  mv "$ROOT_CACHE.tmp" "$ROOT_CACHE"
  echo "$ROOT_PACKAGES" >"$ROOT_CACHE.stamp"
}

# mount_scratch_root DIR: DIR/root becomes a writable view of the cached root (overlayfs,
# or a copy where overlayfs is not available). umount_scratch_root DIR undoes it.
mount_scratch_root() {
  local dir="$1"
  mkdir -p "$dir/upper" "$dir/work" "$dir/root"
  if ! mount -t overlay overlay \
      -o "lowerdir=$ROOT_CACHE,upperdir=$dir/upper,workdir=$dir/work" "$dir/root" 2>/dev/null; then
    echo "(overlayfs unavailable: copying the root)"
    cp -a "$ROOT_CACHE/." "$dir/root/"
  fi
}
umount_scratch_root() {
  local dir="$1"
  if mountpoint -q "$dir/root"; then umount "$dir/root" || umount -l "$dir/root"; fi
  rm -rf "$dir"
}
