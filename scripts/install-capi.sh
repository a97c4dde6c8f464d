#!/usr/bin/env bash
# scripts/install-capi.sh: build and install the C API of umm (libumm + umm.h + umm.pc).
#
# Usage: scripts/install-capi.sh PREFIX [--debug]
#   PREFIX         e.g. /usr/local (needs root) or $HOME/.local
#   --debug        install the debug build instead of the release build
#   DESTDIR=...    staged install (packaging): files go to $DESTDIR$PREFIX/...
#   LIBDIR=...     library directory (default PREFIX/lib)
#
# Installs:
#   $PREFIX/include/umm.h
#   $LIBDIR/libumm.so.<soname version> (+ libumm.so.<soname version> and libumm.so links), libumm.a
#   $LIBDIR/pkgconfig/umm.pc
# Then: cc app.c $(pkg-config --cflags --libs umm)       (PKG_CONFIG_PATH=$LIBDIR/pkgconfig
# if PREFIX is not a default pkg-config location; run with LD_LIBRARY_PATH=$LIBDIR or link
# with -Wl,-rpath,$LIBDIR if it is not a default library location).
# Static: cc app.c $(pkg-config --cflags umm) $LIBDIR/libumm.a $(pkg-config --libs --static umm | sed 's/-lumm//')
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$repo"

[ $# -ge 1 ] || { sed -n '3,9p' "$0" >&2; exit 2; }
prefix="$1"
profile=release
[ "${2:-}" = "--debug" ] && profile=debug
case "$prefix" in /*) ;; *) echo "PREFIX must be absolute: $prefix" >&2; exit 2 ;; esac
libdir="${LIBDIR:-$prefix/lib}"
includedir="$prefix/include"
destdir="${DESTDIR:-}"

flags=()
[ "$profile" = release ] && flags+=(--release)
echo "building umm-capi ($profile)..."
cargo build "${flags[@]}" -p umm-capi --locked
target="${CARGO_TARGET_DIR:-$repo/target}/$profile"

version="$(cargo pkgid -p umm-capi | sed 's/.*[#@]//')"
major="${version%%.*}"
rest="${version#*.}"
minor="${rest%%.*}"
if [ "$major" = 0 ]; then soname="libumm.so.0.$minor"; else soname="libumm.so.$major"; fi
# The system libraries a static link needs, as rustc reports them.
native="$(cargo rustc "${flags[@]}" -p umm-capi --lib --crate-type staticlib --locked -- --print native-static-libs 2>&1 |
    sed -n 's/.*native-static-libs: //p' | tail -1)"
[ -n "$native" ] || native="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

install -d "$destdir$includedir" "$destdir$libdir/pkgconfig"
install -m 0644 capi/include/umm.h "$destdir$includedir/umm.h"
install -m 0755 "$target/libumm.so" "$destdir$libdir/libumm.so.$version"
ln -sfn "libumm.so.$version" "$destdir$libdir/$soname"
ln -sfn "$soname" "$destdir$libdir/libumm.so"
install -m 0644 "$target/libumm.a" "$destdir$libdir/libumm.a"
sed -e "s|@PREFIX@|$prefix|" -e "s|@LIBDIR@|$libdir|" -e "s|@INCLUDEDIR@|$includedir|" \
    -e "s|@VERSION@|$version|" -e "s|@NATIVE_LIBS@|$native|" capi/umm.pc.in >"$destdir$libdir/pkgconfig/umm.pc"
chmod 0644 "$destdir$libdir/pkgconfig/umm.pc"
echo "installed libumm $version into $destdir$prefix:"
ls -l "$destdir$includedir/umm.h" "$destdir$libdir"/libumm.* "$destdir$libdir/pkgconfig/umm.pc" | sed 's/^/  /'
