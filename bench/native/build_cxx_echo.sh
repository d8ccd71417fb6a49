#!/bin/sh
# Build cxx_echo, the gRPC C++ transport floor (bench/native/cxx_echo.cc over Debian's libgrpc++):
#   sh bench/native/build_cxx_echo.sh [OUT] [--no-install]
# OUT defaults to build/bench/cxx_echo (ignored by git). Without libgrpc++'s headers it installs
# Debian's libgrpc++-dev (and pkg-config) with apt-get when run as root with apt-get available,
# unless --no-install; otherwise it says what to install and exits 1.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/build/bench/cxx_echo"
install=1
for a in "$@"; do
  case "$a" in
    --no-install) install=0 ;;
    *) out="$a" ;;
  esac
done
cxx="${CXX:-c++}"

have_lib() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists grpc++; }

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "cxx_echo: no C++ compiler ($cxx); install one (Debian: apt-get install -y g++)" >&2
  exit 1
fi
if ! have_lib; then
  if [ "$install" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "cxx_echo: installing libgrpc++-dev and pkg-config (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q libgrpc++-dev pkg-config >&2 || { apt-get update -q >&2 && apt-get install -y -q libgrpc++-dev pkg-config >&2; }
  fi
  if ! have_lib; then
    echo "cxx_echo: libgrpc++'s headers are missing: install Debian's libgrpc++-dev and pkg-config" >&2
    echo "          (apt-get install -y libgrpc++-dev pkg-config), then run this again" >&2
    exit 1
  fi
fi
mkdir -p "$(dirname "$out")"
# shellcheck disable=SC2046  # pkg-config's flags are words
"$cxx" -O2 -std=c++17 -Wall -Wextra -Werror $(pkg-config --cflags grpc++) -o "$out.tmp" "$here/cxx_echo.cc" \
  $(pkg-config --libs grpc++)
mv "$out.tmp" "$out"
echo "cxx_echo: built $out (libgrpc++ $(pkg-config --modversion grpc++))" >&2
