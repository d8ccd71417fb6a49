#!/bin/sh
# Build h2gen, the native open-loop engine of `uwrt bench` (bench/native/h2gen.c over libnghttp2),
# with the system C compiler:   sh bench/native/build.sh [OUT] [--no-install]
# OUT defaults to build/bench/h2gen (ignored by git). When libnghttp2's headers are missing it
# installs Debian's libnghttp2-dev (and pkg-config) with apt-get if it runs as root with apt-get
# available, unless --no-install; otherwise it says what to install and exits 1.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/build/bench/h2gen"
install=1
for a in "$@"; do
  case "$a" in
    --no-install) install=0 ;;
    *) out="$a" ;;
  esac
done
cc="${CC:-cc}"

have_lib() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libnghttp2; }

if ! command -v "$cc" >/dev/null 2>&1; then
  echo "bench-native: no C compiler ($cc); install one (Debian: apt-get install -y gcc)" >&2
  exit 1
fi
if ! have_lib; then
  if [ "$install" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench-native: installing libnghttp2-dev and pkg-config (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q libnghttp2-dev pkg-config >&2 || { apt-get update -q >&2 && apt-get install -y -q libnghttp2-dev pkg-config >&2; }
  fi
  if ! have_lib; then
    echo "bench-native: libnghttp2's headers are missing: install Debian's libnghttp2-dev and pkg-config" >&2
    echo "              (apt-get install -y libnghttp2-dev pkg-config), then run make bench-native again" >&2
    exit 1
  fi
fi
mkdir -p "$(dirname "$out")"
# shellcheck disable=SC2046  # pkg-config's flags are words
"$cc" -O2 -g -std=gnu11 -Wall -Wextra -Werror $(pkg-config --cflags libnghttp2) -o "$out.tmp" "$here/h2gen.c" \
  $(pkg-config --libs libnghttp2)
mv "$out.tmp" "$out"
echo "bench-native: built $out (libnghttp2 $(pkg-config --modversion libnghttp2))" >&2
