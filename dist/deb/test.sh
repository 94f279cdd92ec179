#!/usr/bin/env bash
# Tests the Debian package of the edge agent with dpkg on this machine:
# install, upgrade, remove, reinstall, purge and install again after a
# purge, checking the files, the service user, the directories and what
# each step keeps.
#
#   dist/deb/test.sh [--binary PATH] [--arm64-binary PATH]
#
# As root, on Debian, on a machine without the package, the fleet-agent
# user or /var/lib/fleet-edge-agent (it refuses otherwise). The binary
# defaults to $CARGO_TARGET_DIR/debug/edge-agent (CARGO_TARGET_DIR:
# /var/cache/fleet-target), built for this machine. With --arm64-binary, the
# arm64 package is built too and its metadata checked. The package is
# purged at the end, and on failure: the machine is left as it was found.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
package=fleet-edge-agent
user=fleet-agent
state=/var/lib/fleet-edge-agent
etc=/etc/fleet-edge-agent
unit=/lib/systemd/system/fleet-edge-agent.service

binary=${CARGO_TARGET_DIR:-/var/cache/fleet-target}/debug/edge-agent
arm64_binary=''
while [ $# -gt 0 ]; do
    case "$1" in
    --binary) binary=${2:?--binary needs a path} && shift 2 ;;
    --arm64-binary) arm64_binary=${2:?--arm64-binary needs a path} && shift 2 ;;
    *) echo "usage: dist/deb/test.sh [--binary PATH] [--arm64-binary PATH]" >&2 && exit 2 ;;
    esac
done

step=setup
fail() {
    echo "dist/deb/test.sh: FAILED ($step): $*" >&2
    exit 1
}
# check DESCRIPTION COMMAND...: runs the command, fails with the description.
check() {
    local what=$1
    shift
    "$@" || fail "$what"
}
# Owner, group and octal mode of a path.
owner_mode() { stat -c '%U:%G %a' "$1"; }
# dpkg's status and version of the package; nothing when it is not installed.
installed_version() {
    local s
    s=$(dpkg-query -W -f='${Status} ${Version}' "$package" 2>/dev/null) || true
    case "$s" in *" not-installed"*) ;; *) echo "$s" ;; esac
}
no_user() { ! getent passwd "$user" >/dev/null && ! getent group "$user" >/dev/null; }
as_agent() { runuser -u "$user" -- "$@"; }

[ "$(id -u)" = 0 ] || fail "run as root (dpkg -i installs the package on this machine)"
command -v dpkg-deb >/dev/null || fail "not a Debian machine: no dpkg-deb"
[ -x "$binary" ] || fail "no binary at $binary: cargo build -p fleet-edge-agent --bin edge-agent"
# What purge deletes must not be someone else's.
[ -z "$(installed_version)" ] || fail "$package is already on this machine ($(installed_version)); purge it first"
no_user || fail "user or group $user exists already; this test would delete it"
[ ! -e "$state" ] || fail "$state exists already; this test would delete it"
[ ! -e "$etc" ] || fail "$etc exists already; this test would delete it"
if [ -d /run/systemd/system ]; then
    echo "note: systemd is running; the package's maintainer scripts will talk to it"
fi

work=$(mktemp -d)
cleanup() {
    local rc=$?
    if [ $rc -ne 0 ] && [ -n "$(installed_version)" ]; then
        echo "dist/deb/test.sh: purging $package after the failure" >&2
        dpkg -P "$package" >/dev/null || true
    fi
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT

arch=$(dpkg --print-architecture)
# Fast compression: these packages are thrown away.
export DPKG_DEB_COMPRESSOR_TYPE=gzip DPKG_DEB_COMPRESSOR_LEVEL=1
step=build
old=$("$here/build.sh" --binary "$binary" --arch "$arch" --version 0.0.1~test1 --out "$work")
new=$("$here/build.sh" --binary "$binary" --arch "$arch" --out "$work")
new_version=$(dpkg-deb -f "$new" Version)
cargo_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$root/Cargo.toml")
check "the default version is the workspace's ($cargo_version), not $new_version" \
    [ "$new_version" = "${cargo_version/-/\~}" ]
check "0.0.1~test1 sorts before $new_version" dpkg --compare-versions 0.0.1~test1 lt "$new_version"

dpkg-deb --info "$new"
dpkg-deb --contents "$new"
check "Architecture is $arch" [ "$(dpkg-deb -f "$new" Architecture)" = "$arch" ]
check "Depends names libc6" grep -q 'libc6 (>= ' <<<"$(dpkg-deb -f "$new" Depends)"
contents=$(dpkg-deb --contents "$new")
for path in ./usr/bin/edge-agent ./lib/systemd/system/fleet-edge-agent.service \
    ./usr/share/doc/fleet-edge-agent/copyright ./usr/share/doc/fleet-edge-agent/README.Debian \
    ./usr/share/doc/fleet-edge-agent/changelog.Debian.gz; do
    check "the package holds $path" grep -q " $path\$" <<<"$contents"
done
check "every file in the package is root's" \
    [ -z "$(awk '$2 != "root/root"' <<<"$contents")" ]
if command -v lintian >/dev/null; then
    echo "lintian (informational):"
    lintian --no-tag-display-limit "$new" || true
else
    echo "lintian not installed: skipped"
fi

step="install $(basename "$old")"
dpkg -i "$old" || fail "dpkg -i $old"
check "dpkg reports it installed" [ "$(installed_version)" = "install ok installed 0.0.1~test1" ]
check "edge-agent --version runs" /usr/bin/edge-agent --version
passwd_entry=$(getent passwd "$user") || fail "no user $user"
IFS=: read -r _ _ uid gid _ home shell <<<"$passwd_entry"
sys_uid_max=$(awk '$1 == "SYS_UID_MAX" { print $2 }' /etc/login.defs 2>/dev/null)
check "$user is a system user (uid $uid <= ${sys_uid_max:-999})" [ "$uid" -le "${sys_uid_max:-999}" ]
check "$user's shell is nologin, not $shell" [ "$shell" = /usr/sbin/nologin ]
check "$user's home is $state, not $home" [ "$home" = "$state" ]
check "$user's group is $user" [ "$(getent group "$gid" | cut -d: -f1)" = "$user" ]
check "$state is $user's, mode 700 ($(owner_mode "$state"))" \
    [ "$(owner_mode "$state")" = "$user:$user 700" ]
check "$etc is root:$user, mode 750 ($(owner_mode "$etc"))" \
    [ "$(owner_mode "$etc")" = "root:$user 750" ]
check "the installed unit is dist/deb/fleet-edge-agent.service" cmp "$unit" "$here/fleet-edge-agent.service"
stopped_for_good=$(sed -n 's/^pub const STOPPED_FOR_GOOD: u8 = \([0-9]*\);$/\1/p' "$root/edge-agent/src/run.rs")
for line in "User=$user" "Group=$user" "ExecStart=/usr/bin/edge-agent run --state $state" \
    "RestartPreventExitStatus=$stopped_for_good" "ConditionPathExists=$state/agent.json" \
    NoNewPrivileges=yes CapabilityBoundingSet= ProtectSystem=strict ProtectHome=yes \
    PrivateTmp=yes PrivateDevices=yes RestrictAddressFamilies="AF_INET AF_INET6 AF_UNIX" \
    MemoryDenyWriteExecute=yes UMask=0077 "ReadWritePaths=$state"; do
    check "the unit has $line" grep -qxF "$line" "$unit"
done
if command -v systemd-analyze >/dev/null; then
    out=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify: $out"
    # Lines about other units (a container's own) are not this unit's business.
    if grep "fleet-edge-agent" <<<"$out"; then fail "systemd-analyze verify warns about the unit"; fi
    echo "systemd-analyze verify: the unit is clean"
    # Informational: how exposed the sandbox leaves the service.
    systemd-analyze security --offline=true "$unit" 2>/dev/null | tail -n1 || true
else
    echo "systemd-analyze not installed: unit not verified"
fi

# The enrollment of README.Debian, as far as it goes without a coordinator:
# the service user reads a token in /etc/fleet-edge-agent (an empty one here).
install -m 0640 -g "$user" /dev/null "$etc/token"
out=$(as_agent /usr/bin/edge-agent enroll --state "$state" --coordinator localhost:7400 \
    --ca "$etc/ca.crt" --token-file "$etc/token" 2>&1) && fail "enroll with an empty token succeeded"
check "$user reads $etc/token (got: $out)" grep -q "holds no enrollment token" <<<"$out"
out=$(as_agent /usr/bin/edge-agent status --state "$state" 2>&1) && fail "status of an unenrolled device succeeded"
check "$user reads $state (got: $out)" grep -q "edge-agent enroll" <<<"$out"
# State the agent writes, as the agent would.
as_agent sh -c "umask 077 && echo kept >'$state/marker'"

step="upgrade to $(basename "$new")"
dpkg -i "$new" || fail "dpkg -i $new"
check "dpkg reports $new_version installed" [ "$(installed_version)" = "install ok installed $new_version" ]
check "the state is kept" [ "$(cat "$state/marker")" = kept ]
check "the state stays $user's ($(owner_mode "$state/marker"))" [ "$(owner_mode "$state/marker")" = "$user:$user 600" ]
check "$state stays $user's, mode 700" [ "$(owner_mode "$state")" = "$user:$user 700" ]
check "$etc/token is kept" [ -f "$etc/token" ]
check "$user keeps uid $uid" [ "$(id -u "$user")" = "$uid" ]
check "edge-agent --version runs" /usr/bin/edge-agent --version

step="remove"
dpkg -r "$package" || fail "dpkg -r $package"
check "dpkg keeps only its configuration" [ "$(installed_version)" = "deinstall ok config-files $new_version" ]
check "the binary is gone" [ ! -e /usr/bin/edge-agent ]
check "the unit is gone" [ ! -e "$unit" ]
check "the state is kept" [ "$(cat "$state/marker")" = kept ]
check "$etc is kept" [ -f "$etc/token" ]
check "user $user is kept" getent passwd "$user" >/dev/null

step="reinstall after remove"
dpkg -i "$new" || fail "dpkg -i $new"
check "the state is kept" [ "$(cat "$state/marker")" = kept ]
check "$user keeps uid $uid" [ "$(id -u "$user")" = "$uid" ]

step="purge"
dpkg -P "$package" || fail "dpkg -P $package"
check "dpkg forgets the package" [ -z "$(installed_version)" ]
check "the binary is gone" [ ! -e /usr/bin/edge-agent ]
check "$state is gone" [ ! -e "$state" ]
check "$etc is gone" [ ! -e "$etc" ]
check "user and group $user are gone" no_user

step="install after purge"
dpkg -i "$new" || fail "dpkg -i $new"
check "edge-agent --version runs" /usr/bin/edge-agent --version
check "user $user is back" getent passwd "$user" >/dev/null
check "$state is new and empty" [ -z "$(ls -A "$state")" ]
check "$state is $user's, mode 700" [ "$(owner_mode "$state")" = "$user:$user 700" ]
dpkg -P "$package" || fail "dpkg -P $package"
check "purged: $state is gone" [ ! -e "$state" ]
check "purged: $etc is gone" [ ! -e "$etc" ]
check "purged: dpkg forgets the package" [ -z "$(installed_version)" ]
check "purged: user and group $user are gone" no_user

if [ -n "$arm64_binary" ]; then
    step="arm64 package"
    arm64=$("$here/build.sh" --binary "$arm64_binary" --arch arm64 --out "$work")
    dpkg-deb --info "$arm64"
    check "Architecture is arm64" [ "$(dpkg-deb -f "$arm64" Architecture)" = arm64 ]
    check "the arm64 package holds the agent" grep -q ' ./usr/bin/edge-agent$' <<<"$(dpkg-deb --contents "$arm64")"
fi

echo "dist/deb/test.sh: the package installs, upgrades, removes and purges cleanly"
