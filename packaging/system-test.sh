#!/usr/bin/env bash
# System test under a real systemd (PID 1) in systemd-nspawn: boots a scratch copy of a
# cached Debian 12 root, installs the .deb (the cloudflared stand-in bundled as
# /usr/lib/mcp-tunnel/cloudflared) and checks, inside (packaging/systemtest/inside.sh):
# the start condition holds an unconfigured install back; start reaches active only after
# READY=1; status shows the STATUS line; an MCP call through stand-in -> proxy -> upstream;
# both processes sandboxed as mcp-tunnel; journald structured fields; reload applies a
# route change while staying active (and refuses a broken file); the watchdog is armed
# (a frozen supervisor is killed and restarted); stop is clean; apt purge leaves only
# /var/lib/mcp-tunnel.
#
# The host's own root is never booted: the container's root is an overlay over the cached
# root, in its own cgroups (removed afterwards), with --private-network.
#
# Usage: packaging/system-test.sh [--deb FILE]   (as root; default: build with the stand-in)
# Artifacts (results, the container's journal, console): $MCP_TUNNEL_SYSTEST_ARTIFACTS,
# default target/systest/.
# apt: systemd-container debootstrap (plus what build-packages.sh needs)
# Runtime: ~1.5 min with a warm build and the cached root (+ ~1 min for the first debootstrap).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source packaging/lib.sh
trap 'echo "FAIL unexpected error at line $LINENO: $BASH_COMMAND" >&2' ERR
start=$SECONDS

deb=""
while (($#)); do
  case "$1" in
    --deb) deb="$2"; shift 2 ;;
    *) fail "unknown argument $1 (usage: $0 [--deb FILE])" ;;
  esac
done
[[ $EUID -eq 0 ]] || fail "run as root (systemd-nspawn, overlay mount, cgroups)"
need systemd-nspawn systemd-container

work="$(mktemp -d /tmp/mcp-tunnel-systest.XXXXXX)"
name="ci-nspawn-$$"
cgroups=()
cleanup() {
  local cg
  umount_scratch_root "$work/ct" 2>/dev/null || true
  for cg in "${cgroups[@]}"; do
    # Whatever is left (nothing, normally) moves back to the parent before rmdir.
    if [[ -f "$cg/cgroup.procs" ]]; then
      while read -r p; do echo "$p" >"$(dirname "$cg")/cgroup.procs" 2>/dev/null || true; done <"$cg/cgroup.procs"
    fi
    find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [[ -d "$cg" ]] && echo "warning: could not remove cgroup $cg" >&2
  done
  rm -rf "$work"
}
trap cleanup EXIT

if [[ -z "$deb" ]]; then
  step "build the .deb with the cloudflared stand-in bundled"
  cargo build --release --locked -p cloudflared-standin
  packaging/build-packages.sh --cloudflared target/release/cloudflared-standin --out "$work/pkg"
  deb="$(echo "$work"/pkg/*.deb)"
fi
[[ -f "$deb" ]] || fail "no .deb: $deb"

ensure_root
step "scratch root over the cached one"
mount_scratch_root "$work/ct"
root="$work/ct/root"
mkdir -p "$root/root/systest"
cp "$deb" "$root/root/systest/mcp-tunnel.deb"
install -m 0755 packaging/systemtest/inside.sh "$root/root/systest/inside.sh"
cp packaging/systemtest/mcp-tunnel-systemtest.service "$root/etc/systemd/system/"
ln -sf ../mcp-tunnel-systemtest.service "$root/etc/systemd/system/multi-user.target.wants/mcp-tunnel-systemtest.service"
echo mcp-tunnel-systest >"$root/etc/hostname"

step "boot it: systemd-nspawn -b (own cgroups $name, private network)"
# Hybrid hierarchy here (cgroup v1 + unified): a cgroup of our own in the named systemd
# hierarchy and the unified one; on a pure cgroup v2 host only the latter exists.
for h in systemd unified ""; do
  base="/sys/fs/cgroup${h:+/$h}"
  [[ -f "$base/cgroup.procs" ]] || continue
  [[ -z "$h" && ${#cgroups[@]} -gt 0 ]] && continue
  mkdir "$base/$name" && cgroups+=("$base/$name")
done
((${#cgroups[@]})) || fail "no cgroup hierarchy to put the container in"
set +e
(
  for cg in "${cgroups[@]}"; do echo "$BASHPID" >"$cg/cgroup.procs"; done
  exec timeout --kill-after=30 600 systemd-nspawn -q -D "$root" --register=no --keep-unit \
    --private-network --machine=mcp-tunnel-systest -b
) >"$work/console.log" 2>&1 </dev/null
nspawn_rc=$?
set -e
echo "systemd-nspawn exited $nspawn_rc after $((SECONDS - start)) s"

results="$root/root/systest/results"
if [[ ! -f "$results" ]]; then
  tail -40 "$work/console.log" >&2
  fail "the test inside the container produced no results (console above)"
fi
artifacts="${MCP_TUNNEL_SYSTEST_ARTIFACTS:-target/systest}"
rm -rf "$artifacts"; mkdir -p "$artifacts"
cp "$root"/root/systest/{results,*.txt,*.log} "$work/console.log" "$artifacts/" 2>/dev/null || true
cat "$results"
echo "(artifacts: $artifacts)"
rc="$(cat "$root/root/systest/rc" 2>/dev/null || echo 1)"
passed=$(grep -c '^PASS' "$results" || true); failed=$(grep -c '^FAIL' "$results" || true)
step "system test: $passed passed, $failed failed, $((SECONDS - start)) s"
[[ "$rc" == 0 && $failed -eq 0 ]] || exit 1
