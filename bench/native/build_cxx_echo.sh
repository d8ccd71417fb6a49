#!/bin/sh
# Build cxx_echo, the gRPC C++ transport floor (bench/native/cxx_echo.cc over Debian's libgrpc++):
#   sh bench/native/build_cxx_echo.sh [OUT] [--no-install]
# OUT defaults to build/bench/cxx_echo (ignored by git). Without libgrpc++'s headers it installs
# Debian's libgrpc++-dev (and pkg-config) with apt-get when run as root with apt-get available,
# unless --no-install; otherwise it says what to install and exits 1.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
. "$here/prereq.sh"
parse_args "$root/build/bench/cxx_echo" "$@"
cxx="${CXX:-c++}"
need_compiler cxx_echo "$cxx" g++
need_lib cxx_echo grpc++ libgrpc++-dev
mkdir -p "$(dirname "$out")"
# shellcheck disable=SC2046  # pkg-config's flags are words
"$cxx" -O2 -std=c++17 -Wall -Wextra -Werror $(pkg-config --cflags grpc++) -o "$out.tmp" "$here/cxx_echo.cc" \
  $(pkg-config --libs grpc++)
mv "$out.tmp" "$out"
echo "cxx_echo: built $out (libgrpc++ $(pkg-config --modversion grpc++))" >&2
