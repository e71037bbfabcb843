#!/usr/bin/env bash
# Builds the Debian package of ferry: ferryd and ferryctl, the systemd unit, the
# sysusers/tmpfiles snippets, man pages, shell completions, example configs and docs.
#
#   packaging/deb/build.sh [--bin-dir DIR] [--out DIR] [--fast]
#
# --bin-dir: where ferryd, ferryctl and ferry-docgen are already built (the test
#            passes its own debug build); default: build them with
#            `cargo build --release --locked` into ${CARGO_TARGET_DIR:-target}/release.
# --out:     where the .deb goes (default: the current directory).
# --fast:    gzip -1 instead of xz -6 (tests package unstripped debug builds).
# Prints the path of the package it wrote. Needs dpkg-deb (Debian's dpkg package);
# no root and no fakeroot: files are owned by root:root through --root-owner-group.
#
# Why a script rather than `cargo deb`: the package needs files that cargo-deb would
# have to be taught about one by one (generated man pages and completions, the
# templated unit), and CI would have to compile cargo-deb first. dpkg-deb is what
# cargo-deb runs in the end.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir=""
out_dir="$PWD"
compress=(-Zxz -z6)
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --out) out_dir="$2"; shift 2 ;;
        --fast) compress=(-Zgzip -z1); shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

command -v dpkg-deb >/dev/null || { echo "build.sh: dpkg-deb not found (apt-get install dpkg)" >&2; exit 1; }

if [ -z "$bin_dir" ]; then
    target="${CARGO_TARGET_DIR:-$repo/target}"
    (cd "$repo" && cargo build --release --locked -p ferryd -p ferryctl -p ferry-docgen) >&2
    bin_dir="$target/release"
fi
for bin in ferryd ferryctl ferry-docgen; do
    [ -x "$bin_dir/$bin" ] || { echo "build.sh: $bin_dir/$bin is missing or not executable" >&2; exit 1; }
done

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml")"
[ -n "$version" ] || { echo "build.sh: no version in [workspace.package] of Cargo.toml" >&2; exit 1; }
arch="$(dpkg --print-architecture)"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/ferry_${version}_${arch}"

install -Dm755 "$bin_dir/ferryd" "$root/usr/bin/ferryd"
install -Dm755 "$bin_dir/ferryctl" "$root/usr/bin/ferryctl"
install -Dm644 "$repo/systemd/ferryd@.service" "$root/usr/lib/systemd/system/ferryd@.service"
install -Dm644 "$repo/systemd/ferry-drill@.service" "$root/usr/lib/systemd/system/ferry-drill@.service"
install -Dm644 "$repo/systemd/ferry-drill@.timer" "$root/usr/lib/systemd/system/ferry-drill@.timer"
install -Dm644 "$repo/systemd/ferry.sysusers" "$root/usr/lib/sysusers.d/ferry.conf"
install -Dm644 "$repo/systemd/ferry.tmpfiles" "$root/usr/lib/tmpfiles.d/ferry.conf"

# Man pages and completions come from the same clap definitions the binaries parse.
"$bin_dir/ferry-docgen" man "$stage/man" >/dev/null
for page in "$stage"/man/*; do
    section="${page##*.}"
    install -Dm644 "$page" "$root/usr/share/man/man$section/$(basename "$page")"
    gzip -9n "$root/usr/share/man/man$section/$(basename "$page")"
done
"$bin_dir/ferry-docgen" completions "$stage/completions" >/dev/null
for cmd in ferryd ferryctl; do
    install -Dm644 "$stage/completions/$cmd.bash" "$root/usr/share/bash-completion/completions/$cmd"
    install -Dm644 "$stage/completions/_$cmd" "$root/usr/share/zsh/vendor-completions/_$cmd"
    install -Dm644 "$stage/completions/$cmd.fish" "$root/usr/share/fish/vendor_completions.d/$cmd.fish"
done

doc="$root/usr/share/doc/ferry"
install -Dm644 "$repo/README.md" "$doc/README.md"
install -Dm644 "$repo/ARCHITECTURE.md" "$doc/ARCHITECTURE.md"
install -Dm644 "$repo/LICENSE" "$doc/copyright"
gzip -9nc "$repo/CHANGELOG.md" > "$doc/changelog.gz"
for f in "$repo"/systemd/*.toml.example "$repo/systemd/grafana-dashboard.json"; do
    install -Dm644 "$f" "$doc/examples/$(basename "$f")"
done

# The glibc the binaries were linked against decides the oldest libc6 they run on.
glibc="2.34"
if command -v objdump >/dev/null; then
    glibc="$(objdump -T "$bin_dir/ferryd" "$bin_dir/ferryctl" | grep -o 'GLIBC_[0-9.]*' \
        | sed 's/GLIBC_//' | sort -uV | tail -1)"
fi

mkdir -p "$root/DEBIAN"
installed_kib="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat > "$root/DEBIAN/control" <<CONTROL
Package: ferry
Version: $version
Architecture: $arch
Maintainer: ferry developers <ferry@localhost>
Installed-Size: $installed_kib
Depends: libc6 (>= $glibc), libgcc-s1, systemd
Recommends: qemu-utils
Section: admin
Priority: optional
Description: block-level continuous data replication for disaster recovery
 ferryd serves protected volumes over NBD on the primary, journals every write
 (io_uring, O_DIRECT, checksummed) and ships ordered write-sets over QUIC with
 mutual TLS to hot standbys, which replay them and keep an undo log for
 point-in-time views and rollback. ferryctl initialises clusters and drives
 failover, switchover, failback, bookmarks and verification.
CONTROL
# Creates the ferry user and /etc/ferry, /var/lib/ferry; never starts an instance:
# which nodes run on this host is the operator's choice (systemctl enable ferryd@NAME).
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null; then systemd-sysusers ferry.conf; fi
    if command -v systemd-tmpfiles >/dev/null; then systemd-tmpfiles --create ferry.conf; fi
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
POSTINST
# Running instances are left alone on upgrade (they keep serving their volumes until
# the operator restarts them); on removal they are stopped.
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop 'ferryd@*.service' || true
fi
PRERM
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTRM
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out_dir"
deb="$out_dir/ferry_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
echo "$deb"
