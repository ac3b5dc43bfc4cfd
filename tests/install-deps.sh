#!/usr/bin/env bash
# Installs what tests/all.sh needs on a fresh Debian 12 machine that has Rust (rustup):
# Debian packages, rustup components and cargo tools. tests/all.sh calls it first; so does
# nothing else (.ci/run only calls tests/all.sh).
#
#   tests/install-deps.sh           as root: install whatever is missing (idempotent)
#   tests/install-deps.sh --check   install nothing; print the commands that would install
#                                   what is missing and exit 1 if anything is
#
# The npm and PyPI peers of the end-to-end tests are installed by tests/e2e/run.sh itself
# (npm ci into tests/e2e/node_modules, a venv in tests/e2e/.venv); they need no root.
# Runtime on a fresh machine: ~1 min for the Debian packages, ~5 min to build the cargo
# tools (kept in ~/.cargo/bin afterwards).
set -euo pipefail

# Debian packages, one per entry: "package|check". The package counts as present when the
# check passes: a command name (found on PATH), or a shell snippet (contains a space).
# Add a package here, with the script that needs it in the comment.
APT_PACKAGES=(
  "nodejs|node"                               # tests/e2e/run.sh: TypeScript MCP SDK peers
  "npm|npm"                                   # tests/e2e/run.sh
  "python3-venv|python3 -c 'import venv, ensurepip'"  # tests/e2e/run.sh: Python MCP SDK peers
  "curl|curl"                                 # tests/e2e/run.sh
  "openssl|openssl"                           # tests/e2e/run.sh (E2E_CERTS=openssl)
  "nginx|nginx"                               # bench/run.sh --smoke: the baseline proxy
  "lintian|lintian"                           # packaging/test-packages.sh
  "rpm|rpm"                                   # packaging/test-packages.sh
  "rpmlint|rpmlint"                           # packaging/test-packages.sh
  "binutils|strip"                            # packaging/build-packages.sh
  "debootstrap|debootstrap"                   # packaging/{test-packages,system-test}.sh
  "systemd-container|systemd-nspawn"          # packaging/system-test.sh
  "prometheus|promtool"                       # packaging/monitoring/check.sh: promtool
  "chromium|chromium"                         # tests/status_page.sh: headless browser
  "util-linux|unshare"                        # loopback-only namespaces of the real-cloudflared steps
  "iproute2|ip"                               # namespaces: ip link set lo up, interface checks
  "procps|pgrep"                              # bench/run.sh (f): cloudflared's PID
)

# rustup components (cargo fmt, cargo clippy).
RUSTUP_COMPONENTS=(rustfmt clippy)

# cargo tools, installed with `cargo install --locked NAME` (no root needed).
CARGO_TOOLS=(
  cargo-deb            # packaging/build-packages.sh
  cargo-generate-rpm   # packaging/build-packages.sh
  cargo-fuzz           # fuzz/ci.sh
)

check_only=false
case "${1:-}" in
  --check) check_only=true ;;
  "") ;;
  *) echo "usage: tests/install-deps.sh [--check]" >&2; exit 2 ;;
esac

present() { # present CHECK
  if [[ "$1" == *' '* ]]; then bash -c "$1" >/dev/null 2>&1; else command -v "$1" >/dev/null; fi
}

apt_missing=()
for entry in "${APT_PACKAGES[@]}"; do
  present "${entry#*|}" || apt_missing+=("${entry%%|*}")
done
components_missing=()
installed_components="$(rustup component list --installed 2>/dev/null || true)"
for c in "${RUSTUP_COMPONENTS[@]}"; do
  grep -q "^$c" <<<"$installed_components" || components_missing+=("$c")
done
tools_missing=()
for t in "${CARGO_TOOLS[@]}"; do
  command -v "$t" >/dev/null || tools_missing+=("$t")
done

if $check_only || [[ $EUID -ne 0 ]]; then
  if ((${#apt_missing[@]} + ${#components_missing[@]} + ${#tools_missing[@]} == 0)); then
    echo "install-deps: everything tests/all.sh needs is installed"
    exit 0
  fi
  echo "install-deps: missing; install with:" >&2
  ((${#apt_missing[@]})) && echo "  apt-get update && apt-get install -y ${apt_missing[*]}" >&2
  ((${#components_missing[@]})) && echo "  rustup component add ${components_missing[*]}" >&2
  ((${#tools_missing[@]})) && echo "  cargo install --locked ${tools_missing[*]}" >&2
  [[ $EUID -eq 0 ]] || echo "(or run tests/install-deps.sh as root, which does exactly that)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ((${#apt_missing[@]})); then
  echo "install-deps: apt-get install ${apt_missing[*]}"
  apt-get update -qq
  apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi
if ((${#components_missing[@]})); then
  echo "install-deps: rustup component add ${components_missing[*]}"
  rustup component add "${components_missing[@]}"
fi
for t in ${tools_missing[@]+"${tools_missing[@]}"}; do
  echo "install-deps: cargo install --locked $t"
  cargo install --locked "$t"
done
# Everything must be there now: a package that installed but does not provide its check
# (a renamed binary, say) fails here rather than as a confusing test failure later.
still=()
for entry in "${APT_PACKAGES[@]}"; do present "${entry#*|}" || still+=("${entry%%|*}"); done
for t in "${CARGO_TOOLS[@]}"; do command -v "$t" >/dev/null || still+=("$t"); done
if ((${#still[@]})); then
  echo "install-deps: still missing after installing: ${still[*]}" >&2
  exit 1
fi
echo "install-deps: everything tests/all.sh needs is installed"
