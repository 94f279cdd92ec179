#!/usr/bin/env bash
# The edge agent for 64-bit ARM (aarch64-unknown-linux-gnu), built on an
# x86_64 Debian 12 machine from Debian's packages alone, then checked under
# qemu's user-mode emulation:
#
#   1. the shipped binary (profile release-agent), its build time and size;
#   2. the agent's unit tests, run by qemu-aarch64;
#   3. the tract kernels the int8 plans select on an ARM CPU with every
#      extension qemu knows (`-cpu max`: dot product, i8mm, SVE, SME);
#   4. one federated round: the aarch64 agent, under qemu, enrolls with and
#      trains for an x86_64 coordinator on loopback (QUIC, mutual TLS).
#
# Timings under emulation say nothing about a real device and are not
# printed; the build times are this machine's.
#
#   dist/aarch64.sh [--install] [--skip-tests] [--skip-round] [--skip-kernels]
#
# --install installs the Debian packages it needs (as root): Debian's
# rustc-web 1.96 with the arm64 standard library, the cross gcc and qemu.
# The cross build uses its own target directory
# ($FLEET_CROSS_TARGET_DIR, default /var/cache/fleet-target-aarch64); the
# x86_64 coordinator comes from the usual one ($CARGO_TARGET_DIR, default
# /var/cache/fleet-target).
set -euo pipefail
cd "$(dirname "$0")/.."

install=0 tests=1 round=1 kernels=1
for arg in "$@"; do
  case "$arg" in
    --install) install=1 ;;
    --skip-tests) tests=0 ;;
    --skip-round) round=0 ;;
    --skip-kernels) kernels=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
PACKAGES="rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"

if [ "$install" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  dpkg --add-architecture arm64
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq $PACKAGES
fi

missing=()
[ -x /usr/bin/cargo ] && /usr/bin/cargo --version 2>/dev/null | grep -q . || missing+=(cargo-web)
[ -d /usr/lib/rustlib/$TARGET/lib ] || missing+=(libstd-rust-web-dev:arm64)
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[ -f $SYSROOT/lib/libc.so.6 ] || missing+=(libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "error: missing Debian packages: ${missing[*]}" >&2
  echo "  install them with: dist/aarch64.sh --install   (as root; or: dpkg --add-architecture arm64 && apt-get update && apt-get install $PACKAGES)" >&2
  exit 1
fi

HOST_CARGO="$(command -v cargo)"
HOST_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/fleet-target}"
CROSS_TARGET_DIR="${FLEET_CROSS_TARGET_DIR:-/var/cache/fleet-target-aarch64}"
QEMU=(qemu-aarch64 -L "$SYSROOT" -cpu max)

# Debian's toolchain for every cross step (rustup's, first on PATH, may
# have no aarch64 standard library), its own target directory, the cross
# linker and C compiler (ring, OpenSSL and SQLite build C), qemu as runner.
cross() {
  env CARGO=/usr/bin/cargo RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
    CARGO_TARGET_DIR="$CROSS_TARGET_DIR" CARGO_INCREMENTAL=0 \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++ \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="${QEMU[*]}" \
    /usr/bin/cargo "$@" --locked --target $TARGET
}

echo "toolchain: $(/usr/bin/rustc --version) (Debian), linker $(aarch64-linux-gnu-gcc -dumpfullversion), $(qemu-aarch64 --version | head -1)"

# 1. The shipped binary.
start=$(date +%s)
cross build --profile release-agent -p fleet-edge-agent --bin edge-agent
build_s=$(( $(date +%s) - start ))
AGENT_BIN="$CROSS_TARGET_DIR/$TARGET/release-agent/edge-agent"
file "$AGENT_BIN" 2>/dev/null || true
size_bytes=$(stat -c %s "$AGENT_BIN")
echo "aarch64 agent: $AGENT_BIN, $size_bytes bytes ($(( size_bytes / 1024 )) KiB, stripped), built in $build_s s"
"${QEMU[@]}" "$AGENT_BIN" --version

# The test harness, the int8 calibration and the agent's run loop may start
# threads. Check first that
# qemu runs a threaded aarch64 program on this host (on some hosts qemu-user
# hangs in the guest's first pthread_create, before its clone).
if [ "$tests" = 1 ] || [ "$round" = 1 ] || [ "$kernels" = 1 ]; then
  probe=$(mktemp -d)
  printf '%s\n' '#include <pthread.h>' '#include <stdio.h>' \
    'static void *f(void *a) { return a; }' \
    'int main(void) { pthread_t t; if (pthread_create(&t, 0, f, 0)) return 1; pthread_join(t, 0); puts("threads: ok"); return 0; }' \
    >"$probe/threads.c"
  aarch64-linux-gnu-gcc -O2 -pthread "$probe/threads.c" -o "$probe/threads"
  if ! timeout 20 "${QEMU[@]}" "$probe/threads"; then
    rm -rf "$probe"
    echo "error: $(qemu-aarch64 --version | head -1) cannot run a threaded aarch64 program on this host" >&2
    echo "  (kernel $(uname -r)): a pthread_create under emulation did not return in 20 s." >&2
    echo "  The unit tests, the kernel listing and the round start threads; run them on an aarch64" >&2
    echo "  machine or another host, or pass --skip-tests --skip-kernels --skip-round to build only." >&2
    exit 1
  fi
  rm -rf "$probe"
fi

# 2. The agent's unit tests (the library and the binary's), under qemu.
if [ "$tests" = 1 ]; then
  start=$(date +%s)
  cross test -p fleet-edge-agent --lib --bins --no-run
  echo "aarch64 unit tests built in $(( $(date +%s) - start )) s"
  cross test -p fleet-edge-agent --lib --bins
fi

# 3. Which int8 kernels tract's plans select on an ARM CPU with every
# extension (read by tract from the CPU's feature registers, which qemu
# emulates).
if [ "$kernels" = 1 ]; then
  cross build --release -p fleet-edge-agent --example int8_kernels
  "${QEMU[@]}" "$CROSS_TARGET_DIR/$TARGET/release/examples/int8_kernels" --kernels-only
fi

# 4. One round: x86_64 coordinator, aarch64 agent under qemu.
if [ "$round" = 1 ]; then
  env CARGO_TARGET_DIR="$HOST_TARGET_DIR" CARGO_INCREMENTAL=0 \
    "$HOST_CARGO" build --locked -p fleet-coordinator --bin coordinator
  COORD="$HOST_TARGET_DIR/debug/coordinator"
  AGENT=("${QEMU[@]}" "$AGENT_BIN")
  WORK=$(mktemp -d)
  # shellcheck source=dist/round.sh
  . dist/round.sh
  trap round_cleanup EXIT
  round_start_coordinator
  round_enroll_and_run_agent --max-rounds 1
  round_run_task 1
  wait "$ROUND_AGENT_PID" || round_fail "the aarch64 agent exited with status $?"
  ROUND_AGENT_PID=""
  round_admin rounds 1
  echo "one round with the aarch64 agent under qemu: closed with its update"
  round_cleanup
  trap - EXIT
  rm -rf "$WORK"
fi
