#!/usr/bin/env bash
# Builds the .deb and .rpm (without and with a bundled cloudflared) and checks them:
#  - build-packages.sh refuses a --cloudflared that is not cloudflared, or not there;
#  - lintian and rpmlint: no errors and no warnings (justified exceptions live in
#    packaging/debian/lintian-overrides and packaging/rpmlint.toml);
#  - dpkg-deb -c and rpm -qpl list exactly packaging/expected/*.txt (path, mode, owner);
#    conffiles / %config(noreplace); Recommends / Suggests cloudflared only without the
#    bundle; the bundle's cloudflared.version records the binary's version and sha256;
#  - systemd-analyze verify of the unit (in the package, over a Debian root) prints nothing
#    on stderr, and a broken copy does print (the check can fail);
#  - systemd-analyze security --offline=yes: exposure <= 2.0;
#  - rpm --root into a scratch Debian root: %post creates the user and the state directory
#    and presets the unit, %config(noreplace) keeps an edited config on reinstall, %preun
#    and %postun run on erase and the state directory stays.
#
# Usage: packaging/test-packages.sh        (as root: rpm --root chroots, overlay mounts)
#        UPDATE_EXPECTED=1 packaging/test-packages.sh   rewrites packaging/expected/*.txt
#        (after adding a subcommand or a packaged file; review and commit the diff)
# apt: lintian rpm rpmlint debootstrap binutils (systemd-analyze comes with systemd)
# cargo: cargo-deb cargo-generate-rpm (cargo install --locked cargo-deb cargo-generate-rpm)
# Runtime: ~1 min with a warm release build and the cached root; the first debootstrap
# adds ~1 min (cached in /var/cache/mcp-tunnel-ci, override with MCP_TUNNEL_CI_CACHE).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source packaging/lib.sh
trap 'echo "FAIL unexpected error at line $LINENO: $BASH_COMMAND" >&2' ERR
start=$SECONDS

[[ $EUID -eq 0 ]] || fail "run as root (rpm --root and the overlay mount need it)"
need lintian lintian; need rpmlint rpmlint; need rpm rpm; need systemd-analyze systemd
need strip binutils

work="$(mktemp -d /tmp/mcp-tunnel-pkgtest.XXXXXX)"
cleanup() { umount "$work/rpmroot/root/proc" 2>/dev/null || true; umount_scratch_root "$work/rpmroot" 2>/dev/null || true; umount_scratch_root "$work/unitroot" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

step "build without a bundled cloudflared"
packaging/build-packages.sh --out "$work/plain"
standin="target/release/cloudflared-standin"
cargo build --release --locked -p cloudflared-standin
[[ -x "$standin" ]] || fail "$standin missing after cargo build --release -p cloudflared-standin (standin/src/main.rs, issue 3)"

step "build-packages.sh refuses binaries that are not cloudflared"
for bogus in /bin/true target/release/mcp-tunnel /nonexistent; do
  if out="$(packaging/build-packages.sh --cloudflared "$bogus" --out "$work/bogus" 2>&1)"; then
    fail "build-packages.sh accepted --cloudflared $bogus"
  fi
  [[ ! -e "$work/bogus" ]] || fail "build-packages.sh wrote packages for --cloudflared $bogus"
  pass "refused $bogus: $(tail -n1 <<<"$out")"
done

step "build with the cloudflared stand-in bundled"
packaging/build-packages.sh --cloudflared "$standin" --out "$work/bundled"

deb_files() { dpkg-deb -c "$1" | awk '{print $1, $2, $6}' | sed 's# \./# /#; s#/$##' | LC_ALL=C sort -k3; }
rpm_files() { rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}/%{FILEGROUPNAME} %{FILENAMES}\n]' "$1" | LC_ALL=C sort -k3; }
compare() { # compare NAME ACTUAL_FILE EXPECTED_FILE
  if [[ -n "${UPDATE_EXPECTED:-}" ]] && ! cmp -s "$2" "$3"; then
    diff -u "$3" "$2" || true; cp "$2" "$3"; echo "UPDATED $3 (review the diff above, then commit it)"
  fi
  if diff -u "$3" "$2"; then pass "$1: file list, modes and owners as in $3"
  else fail "$1: contents differ from $3 (diff above: - expected, + actual)"; fi
}

for flavour in plain bundled; do
  deb="$(echo "$work/$flavour"/*.deb)"; rpmf="$(echo "$work/$flavour"/*.rpm)"
  step "$flavour: lintian $(basename "$deb")"
  lintian --fail-on error,warning --tag-display-limit 0 "$deb" 2>&1 | grep -v '^running with root privileges' || true
  lintian --fail-on error,warning "$deb" >/dev/null 2>&1 || fail "$flavour: lintian reports errors or warnings"
  pass "$flavour: lintian clean (overrides: packaging/debian/lintian-overrides)"

  step "$flavour: rpmlint $(basename "$rpmf")"
  rpmlint -c packaging/rpmlint.toml "$rpmf" >"$work/rpmlint.out" 2>&1 || true
  grep -E '^mcp-tunnel|checked;' "$work/rpmlint.out" || true
  grep -q ' 0 errors, 0 warnings' "$work/rpmlint.out" || fail "$flavour: rpmlint reports errors or warnings"
  pass "$flavour: rpmlint clean (filters: packaging/rpmlint.toml)"

  step "$flavour: exact contents"
  deb_files "$deb" >"$work/$flavour.deb.txt"; compare "$flavour deb" "$work/$flavour.deb.txt" "packaging/expected/deb-$flavour.txt"
  rpm_files "$rpmf" >"$work/$flavour.rpm.txt"; compare "$flavour rpm" "$work/$flavour.rpm.txt" "packaging/expected/rpm-$flavour.txt"
  [[ "$(dpkg-deb -I "$deb" conffiles)" == "/etc/mcp-tunnel/mcp-tunnel.toml" ]] || fail "$flavour: deb conffiles"
  pass "$flavour deb: conffiles = /etc/mcp-tunnel/mcp-tunnel.toml"
  cfg="$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpmf" | awk 'NF == 2 && $1 ~ /c/')"
  [[ "$cfg" == "cn /etc/mcp-tunnel/mcp-tunnel.toml" ]] || fail "$flavour: rpm config files: $cfg"
  pass "$flavour rpm: %config(noreplace) /etc/mcp-tunnel/mcp-tunnel.toml"
  for s in postinstall preuninstall postuninstall; do
    rpm -qp --scripts "$rpmf" | grep -q "^$s scriptlet" || fail "$flavour rpm: no $s scriptlet"
  done
  pass "$flavour rpm: %post, %preun and %postun scriptlets present"
  rec="$(dpkg-deb -f "$deb" Recommends || true)"; sug="$(rpm -qp --suggests "$rpmf")"
  if [[ $flavour == plain ]]; then
    [[ "$rec" == cloudflared && "$sug" == cloudflared ]] || fail "plain: Recommends/Suggests '$rec'/'$sug', expected cloudflared"
    pass "plain: deb Recommends: cloudflared, rpm Suggests: cloudflared"
  else
    [[ -z "$rec" && -z "$sug" ]] || fail "bundled: Recommends/Suggests '$rec'/'$sug', expected none"
    mkdir -p "$work/x" && dpkg-deb -x "$deb" "$work/x"
    want="version: $("$standin" --version | head -n1)
sha256: $(sha256sum "$standin" | cut -d' ' -f1)"
    [[ "$(cat "$work/x/usr/lib/mcp-tunnel/cloudflared.version")" == "$want" ]] || fail "bundled: cloudflared.version does not record the binary"
    [[ "$(sha256sum <"$work/x/usr/lib/mcp-tunnel/cloudflared")" == "$(sha256sum <"$standin")" ]] || fail "bundled: packed cloudflared differs from the input"
    # The rpm's own file digest (sha256, FILEDIGESTALGO 8) of the packed binary.
    [[ "$(rpm -qp --qf '%{FILEDIGESTALGO}' "$rpmf")" == 8 ]] || fail "bundled rpm: file digests are not sha256"
    rpm -qp --qf '[%{FILEDIGESTS} %{FILENAMES}\n]' "$rpmf" | grep -qx "$(sha256sum <"$standin" | cut -d' ' -f1) /usr/lib/mcp-tunnel/cloudflared" \
      || fail "bundled rpm: packed cloudflared differs from the input"
    pass "bundled: no Recommends/Suggests; cloudflared packed byte for byte; cloudflared.version = $(tr '\n' ' ' <<<"$want")"
  fi
done

ensure_root

step "systemd-analyze verify (unit from the .deb, over a Debian 12 root)"
mount_scratch_root "$work/unitroot"
dpkg-deb -x "$(echo "$work"/plain/*.deb)" "$work/unitroot/root"
verify() { MANPATH="$work/unitroot/root/usr/share/man" systemd-analyze verify --root="$work/unitroot/root" "$1" 2>&1 >/dev/null; }
errs="$(verify mcp-tunnel.service)"
[[ -z "$errs" ]] || { echo "$errs" >&2; fail "systemd-analyze verify printed the lines above"; }
pass "systemd-analyze verify: stderr empty"
sed 's/^KillMode=mixed/KillMode=mixed\nKillMod=typo/' systemd/mcp-tunnel.service >"$work/unitroot/root/etc/systemd/system/mcp-tunnel-broken.service"
errs="$(verify mcp-tunnel-broken.service)"
[[ -n "$errs" ]] || fail "systemd-analyze verify is silent on an unknown key: the check above proves nothing"
pass "systemd-analyze verify does report a broken copy: $(head -n1 <<<"$errs")"
umount_scratch_root "$work/unitroot"

step "systemd-analyze security --offline=yes"
systemd-analyze security --offline=yes systemd/mcp-tunnel.service 2>&1 | grep -E '✗|Overall' || true
exposure="$(systemd-analyze security --offline=yes systemd/mcp-tunnel.service 2>&1 | sed -n 's/.*Overall exposure level for mcp-tunnel.service: \([0-9.]*\).*/\1/p')"
[[ -n "$exposure" ]] || fail "no exposure figure in systemd-analyze security output"
awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "exposure $exposure > 2.0"
pass "exposure $exposure <= 2.0"

step "rpm --root: install into a scratch Debian 12 root, scripts run"
mount_scratch_root "$work/rpmroot"
r="$work/rpmroot/root"
# /proc inside, as dnf --installroot and mock provide (systemd-tmpfiles refuses without it).
mount -t proc proc "$r/proc"
rpmf="$(echo "$work"/plain/*.rpm)"
rpm --root "$r" -ivh --nodeps "$rpmf" 2>&1 | tee "$work/rpm-install.log"
grep -q 'mcp-tunnel: %post (1)' "$work/rpm-install.log" || fail "rpm: %post did not print its line"
grep -q '^mcp-tunnel:' "$r/etc/passwd" || fail "rpm %post: no mcp-tunnel user in the root's /etc/passwd"
pass "%post ran: user $(grep '^mcp-tunnel:' "$r/etc/passwd")"
uid="$(awk -F: '$1 == "mcp-tunnel" {print $3}' "$r/etc/passwd")"   # names resolve against the host
[[ "$(stat -c '%a %u' "$r/var/lib/mcp-tunnel")" == "700 $uid" ]] || fail "rpm %post: /var/lib/mcp-tunnel is $(stat -c '%a uid %u' "$r/var/lib/mcp-tunnel"), expected 700 uid $uid"
pass "%post ran: /var/lib/mcp-tunnel 0700 mcp-tunnel (tmpfiles)"
[[ -L "$r/etc/systemd/system/multi-user.target.wants/mcp-tunnel.service" ]] || fail "rpm %post: unit not enabled by preset (the Debian root has no preset files: default enable)"
pass "%post ran: systemctl preset enabled the unit (multi-user.target.wants symlink)"
echo "# edited by the operator" >>"$r/etc/mcp-tunnel/mcp-tunnel.toml"
rpm --root "$r" -Uvh --replacepkgs --nodeps "$rpmf" >"$work/rpm-reinstall.log" 2>&1 || { cat "$work/rpm-reinstall.log"; fail "rpm reinstall"; }
grep -q '# edited by the operator' "$r/etc/mcp-tunnel/mcp-tunnel.toml" || fail "%config(noreplace): the edited config was replaced"
pass "reinstall (rpm -U --replacepkgs) keeps the operator's edit of the config"
echo secret >"$r/var/lib/mcp-tunnel/tunnel-token"
rpm --root "$r" -e mcp-tunnel 2>&1 | tee "$work/rpm-erase.log"
grep -q 'mcp-tunnel: %preun (0)' "$work/rpm-erase.log" || fail "rpm -e: %preun did not run"
grep -q 'mcp-tunnel: %postun (0)' "$work/rpm-erase.log" || fail "rpm -e: %postun did not run"
[[ ! -e "$r/usr/bin/mcp-tunnel" && ! -L "$r/etc/systemd/system/multi-user.target.wants/mcp-tunnel.service" ]] || fail "rpm -e left the binary or the enable symlink"
[[ -f "$r/var/lib/mcp-tunnel/tunnel-token" ]] || fail "rpm -e removed the state directory"
grep -q '# edited by the operator' "$r/etc/mcp-tunnel/mcp-tunnel.toml.rpmsave" || fail "rpm -e: the edited config was not saved as .rpmsave"
pass "rpm -e: %preun (disable) and %postun ran; binary and enable symlink gone; edited config kept as .rpmsave; /var/lib/mcp-tunnel kept"
umount "$r/proc"
umount_scratch_root "$work/rpmroot"

step "all package checks passed in $((SECONDS - start)) s"
