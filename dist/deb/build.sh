#!/usr/bin/env bash
# Builds the Debian package of the edge agent from a built binary, with
# dpkg-deb alone (nothing fetched, no debian/ source tree):
#
#   dist/deb/build.sh --binary PATH --arch amd64|arm64 [--version V] [--out DIR]
#
# writes DIR/fleet-edge-agent_<V>_<arch>.deb (DIR: the current directory;
# V: the workspace version, `[workspace.package] version` in Cargo.toml).
# The binary is stripped on the way in unless it already is (its own
# architecture's strip is needed: `strip` for amd64, `aarch64-linux-gnu-strip`
# for arm64; without it the binary goes in as it is). Depends is derived
# from the libraries the binary links and the glibc symbol versions it uses.
# The unit is dist/deb/fleet-edge-agent.service, which a test of
# edge-agent/src/install.rs keeps equal to `edge-agent install`'s.
#
# Environment: SOURCE_DATE_EPOCH (default: the last commit's time) dates
# the files and changelog; DPKG_DEB_COMPRESSOR_TYPE/LEVEL choose the
# compression (dpkg-deb's default: xz); DEBFULLNAME and DEBEMAIL name the
# maintainer (also --maintainer "Name <email>").
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
package=fleet-edge-agent

die() {
    echo "dist/deb/build.sh: $*" >&2
    exit 1
}

usage() {
    echo "usage: dist/deb/build.sh --binary PATH --arch amd64|arm64 [--version V] [--out DIR] [--maintainer 'Name <email>']" >&2
    exit 2
}

binary='' arch='' version='' out=. maintainer=''
while [ $# -gt 0 ]; do
    case "$1" in
    --binary) binary=${2:?--binary needs a path} && shift 2 ;;
    --arch) arch=${2:?--arch needs amd64 or arm64} && shift 2 ;;
    --version) version=${2:?--version needs a version} && shift 2 ;;
    --out) out=${2:?--out needs a directory} && shift 2 ;;
    --maintainer) maintainer=${2:?--maintainer needs 'Name <email>'} && shift 2 ;;
    -h | --help) usage ;;
    *) echo "dist/deb/build.sh: unknown argument $1" >&2 && usage ;;
    esac
done
{ [ -n "$binary" ] && [ -n "$arch" ]; } || usage
[ -f "$binary" ] || die "no binary at $binary (build it first, e.g. cargo build --profile release-agent -p fleet-edge-agent --bin edge-agent)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"
command -v readelf >/dev/null || die "readelf not found (apt-get install binutils)"

# `key = "value"` under [section] of a Cargo.toml.
toml_value() { # file section key
    awk -v section="[$2]" -v key="$3" '
        /^\[/ { inside = ($0 == section); next }
        inside && $1 == key && $2 == "=" {
            v = $0; sub(/^[^=]*=[ \t]*"/, "", v); sub(/".*$/, "", v); print v; exit
        }' "$1"
}

# The ELF machine each architecture's binary must have (e_machine, at byte 18).
case "$arch" in
amd64) machine=3e00 strip=strip ;;
arm64) machine=b700 strip=aarch64-linux-gnu-strip ;;
*) die "--arch $arch: expected amd64 or arm64" ;;
esac
[ "$(od -An -tx1 -N4 "$binary" | tr -d ' \n')" = 7f454c46 ] || die "$binary is not an ELF binary"
found=$(od -An -tx1 -j18 -N2 "$binary" | tr -d ' \n')
[ "$found" = "$machine" ] || die "$binary is not an $arch binary (ELF machine 0x${found:2:2}${found:0:2})"

if [ -z "$version" ]; then
    version=$(toml_value "$root/Cargo.toml" workspace.package version)
    [ -n "$version" ] || die "no [workspace.package] version in $root/Cargo.toml"
    # A Cargo pre-release (0.2.0-rc.1) sorts before its release, as ~ does in Debian.
    version=${version/-/\~}
fi
dpkg --validate-version "$version" 2>/dev/null || die "--version $version is not a valid Debian version"
license=$(toml_value "$root/Cargo.toml" workspace.package license)
[ -n "$license" ] || die "no [workspace.package] license in $root/Cargo.toml"
summary=$(toml_value "$root/edge-agent/Cargo.toml" package description)
[ -n "$summary" ] || die "no description in $root/edge-agent/Cargo.toml"
if [ -z "$maintainer" ]; then
    maintainer="${DEBFULLNAME:-Fleet edge agent maintainers} <${DEBEMAIL:-root@localhost}>"
fi
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

# Libraries the binary links, as the packages that hold them.
depends=()
for lib in $(readelf -d -W "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
    case "$lib" in
    libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libutil.so.* | ld-linux*.so.*)
        # The newest glibc symbol version used is the oldest glibc that runs it.
        glibc=$(readelf -V -W "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
        depends+=("libc6${glibc:+ (>= $glibc)}")
        ;;
    libgcc_s.so.1) depends+=(libgcc-s1) ;;
    libstdc++.so.6) depends+=(libstdc++6) ;;
    libz.so.1) depends+=(zlib1g) ;;
    libssl.so.3 | libcrypto.so.3) depends+=(libssl3) ;;
    *) die "$binary links $lib: add the Debian package that holds it to build.sh" ;;
    esac
done
[ ${#depends[@]} -gt 0 ] || die "$binary links no libraries (static?): expected glibc"
# useradd and groupadd, for the postinst.
depends+=(passwd)
depends_line=$(printf '%s\n' "${depends[@]}" | sort -u | paste -sd, - | sed 's/,/, /g')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 022
pkg=$work/root
doc=$pkg/usr/share/doc/$package
install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$doc"

if readelf -S -W "$binary" | grep -qE ' \.(symtab|debug_[a-z_]+) '; then
    if command -v "$strip" >/dev/null; then
        "$strip" -o "$pkg/usr/bin/edge-agent" "$binary"
    else
        echo "dist/deb/build.sh: no $strip: $binary goes in unstripped" >&2
        cp "$binary" "$pkg/usr/bin/edge-agent"
    fi
else
    cp "$binary" "$pkg/usr/bin/edge-agent"
fi
chmod 0755 "$pkg/usr/bin/edge-agent"
install -m 0644 "$here/fleet-edge-agent.service" "$pkg/lib/systemd/system/"
install -m 0644 "$here/README.Debian" "$doc/"
for script in postinst prerm postrm; do
    install -m 0755 "$here/$script" "$pkg/DEBIAN/"
done

date_rfc2822=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
cat >"$work/changelog" <<EOF
$package ($version) unstable; urgency=medium

  * Built from the fleet learning runtime's workspace by dist/deb/build.sh.

 -- $maintainer  $date_rfc2822
EOF
gzip -9n <"$work/changelog" >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"

# The licence of the workspace (Cargo.toml), in the machine-readable format.
{
    cat <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fleet learning runtime

Files: *
Copyright: the authors of the fleet learning runtime
License: ${license// OR / or }
Comment: The binary also holds Rust crates under their own licences, and
 an embedded subset of Fashion-MNIST (Copyright 2017 Zalando SE, MIT).
EOF
    for id in $(echo "$license" | tr -s ' ()' '\n' | grep -vxE 'OR|AND|WITH|\s*'); do
        echo
        echo "License: $id"
        case "$id" in
        MIT)
            sed 's/^$/./; s/^/ /' <<'EOF'
Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in
all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
EOF
            ;;
        Apache-2.0 | GPL-2 | GPL-3 | LGPL-2.1 | LGPL-3 | MPL-2.0 | CC0-1.0)
            echo " On Debian systems, the full text of the license is in"
            echo " /usr/share/common-licenses/$id."
            ;;
        *) die "no text for licence $id (Cargo.toml): add it to build.sh" ;;
        esac
    done
} >"$doc/copyright"
chmod 0644 "$doc/copyright"

installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<EOF
Package: $package
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends_line
Section: net
Priority: optional
Description: $summary
 The agent of a federated learning fleet: it enrolls a device with a
 coordinator, trains on the device's data when asked and uploads private,
 encoded updates; it serves the deployed model to apps on the device.
 .
 The service (fleet-edge-agent.service) runs as the system user
 fleet-agent once the device is enrolled: see README.Debian.
EOF

mkdir -p "$out"
deb=$out/${package}_${version}_${arch}.deb
# Every file root's, whoever builds; dates clamped to SOURCE_DATE_EPOCH.
dpkg-deb --root-owner-group --build "$pkg" "$deb" >/dev/null
echo "$deb"
