#!/usr/bin/env bash
# Builds target/packages/mcp-tunnel_<v>_<arch>.deb and mcp-tunnel-<v>-1.<arch>.rpm.
#
#   packaging/build-packages.sh [--cloudflared PATH] [--out DIR] [--fast]
#
# --cloudflared PATH bundles that binary as /usr/lib/mcp-tunnel/cloudflared after checking
# that its `--version` output identifies it as cloudflared; its version line and sha256 go
# into /usr/lib/mcp-tunnel/cloudflared.version. Without it the packages carry no cloudflared
# and declare `Recommends: cloudflared` (rpm: `Suggests`). Nothing is ever downloaded.
# --fast (test builds) compresses quicker and larger (cargo deb --fast, rpm payload gzip): the
# contents are the same; packing a bundled 40 MB cloudflared takes ~10 s instead of ~3 min.
#
# Needs: cargo, cargo-deb and cargo-generate-rpm (`cargo install --locked cargo-deb
# cargo-generate-rpm`), gzip, sha256sum, strip (binutils). Runtime: ~10 s with a warm release build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "build-packages: error: $*" >&2; exit 1; }

cloudflared=""
out="target/packages"
fast=""
while (($#)); do
  case "$1" in
    --cloudflared) [[ $# -ge 2 ]] || die "--cloudflared needs a PATH"; cloudflared="$2"; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a DIR"; out="$2"; shift 2 ;;
    --fast) fast=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (usage: $0 [--cloudflared PATH] [--out DIR] [--fast])" ;;
  esac
done

for tool in cargo-deb cargo-generate-rpm; do
  command -v "$tool" >/dev/null || die "$tool not found: cargo install --locked cargo-deb cargo-generate-rpm"
done

variant=()
if [[ -n "$cloudflared" ]]; then
  [[ -f "$cloudflared" && -x "$cloudflared" ]] || die "--cloudflared $cloudflared: not an executable file"
  # Ask the binary itself. Official builds print e.g.
  #   cloudflared version 2025.8.1 (built 2025-08-21-1532 UTC)
  version="$("$cloudflared" --version 2>&1 | head -n1)" || die "--cloudflared $cloudflared: \`--version\` failed: $version"
  if [[ ! "$version" =~ ^cloudflared\ version\ ([0-9]{4}\.[0-9]+\.[0-9]+) ]]; then
    die "refusing --cloudflared $cloudflared: its --version output does not identify it as cloudflared: ${version:-<empty>}"
  fi
  sha256="$(sha256sum "$cloudflared" | cut -d' ' -f1)"
  echo "build-packages: bundling cloudflared ${BASH_REMATCH[1]} sha256 $sha256"
  variant=(--variant bundled)
fi

echo "build-packages: cargo build --release --locked -p mcp-tunnel"
cargo build --release --locked -p mcp-tunnel

# Reproducible timestamps in the archives (set after the build: ring's build script
# tracks this variable, so exporting it earlier recompiles the crypto stack).
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

assets="target/pkg-assets"
rm -rf "$assets"
target/release/mcp-tunnel generate-assets --out "$assets"
# cargo-deb strips its own copy; cargo-generate-rpm packs files as they are.
strip --strip-all -o "$assets/mcp-tunnel" target/release/mcp-tunnel
gzip -9n "$assets"/man/*.1
if [[ -n "$cloudflared" ]]; then
  mkdir -p "$assets/bundle"
  install -m 0755 "$cloudflared" "$assets/bundle/cloudflared"
  printf 'version: %s\nsha256: %s\n' "$version" "$sha256" >"$assets/bundle/cloudflared.version"
fi

mkdir -p "$out"
rm -f "$out"/mcp-tunnel*.deb "$out"/mcp-tunnel*.rpm
deb_fast=() rpm_fast=()
if [[ -n "$fast" ]]; then deb_fast=(--fast); rpm_fast=(--payload-compress gzip); fi
cargo deb --no-build ${variant[@]+"${variant[@]}"} ${deb_fast[@]+"${deb_fast[@]}"} --output "$out/"
cargo generate-rpm ${variant[@]+"${variant[@]}"} ${rpm_fast[@]+"${rpm_fast[@]}"} --output "$out/"
echo "build-packages: built"
(cd "$out" && sha256sum mcp-tunnel*.deb mcp-tunnel*.rpm)
