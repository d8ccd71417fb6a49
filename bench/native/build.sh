#!/bin/sh
# Build h2gen, the native open-loop engine of `uwrt bench` (bench/native/h2gen.c over libnghttp2),
# with the system C compiler:   sh bench/native/build.sh [OUT] [--no-install]
# OUT defaults to build/bench/h2gen (ignored by git). When libnghttp2's headers are missing it
# installs Debian's libnghttp2-dev (and pkg-config) with apt-get if it runs as root with apt-get
# available, unless --no-install; otherwise it says what to install and exits 1.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
. "$here/prereq.sh"
parse_args "$root/build/bench/h2gen" "$@"
cc="${CC:-cc}"
need_compiler bench-native "$cc" gcc
need_lib bench-native libnghttp2 libnghttp2-dev
mkdir -p "$(dirname "$out")"
# shellcheck disable=SC2046  # pkg-config's flags are words
"$cc" -O2 -g -std=gnu11 -Wall -Wextra -Werror $(pkg-config --cflags libnghttp2) -o "$out.tmp" "$here/h2gen.c" \
  $(pkg-config --libs libnghttp2)
mv "$out.tmp" "$out"
echo "bench-native: built $out (libnghttp2 $(pkg-config --modversion libnghttp2))" >&2
