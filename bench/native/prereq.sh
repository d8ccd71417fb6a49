# Shared by bench/native/build*.sh (sourced, POSIX sh): arguments and prerequisites of a native build.
#
#   parse_args DEFAULT_OUT "$@"        sets $out (the first non-option argument, else DEFAULT_OUT)
#                                      and $install (0 with --no-install, else 1)
#   need_compiler TAG COMPILER PKG     exits 1 naming the Debian package when COMPILER is absent
#   need_lib TAG PC_NAME DEB_PKG       makes `pkg-config --exists PC_NAME` true: installs DEB_PKG and
#                                      pkg-config with apt-get when $install is 1, running as root and
#                                      apt-get exists; otherwise says what to install and exits 1
# TAG starts every message (the build's name).

parse_args() {
  out="$1"
  shift
  install=1
  for a in "$@"; do
    case "$a" in
      --no-install) install=0 ;;
      *) out="$a" ;;
    esac
  done
}

need_compiler() {
  if ! command -v "$2" >/dev/null 2>&1; then
    echo "$1: no $(case "$3" in g++) echo "C++" ;; *) echo "C" ;; esac) compiler ($2); install one (Debian: apt-get install -y $3)" >&2
    exit 1
  fi
}

_have_lib() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists "$1"; }

need_lib() {
  if _have_lib "$2"; then
    return 0
  fi
  if [ "$install" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "$1: installing $3 and pkg-config (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$3" pkg-config >&2 || { apt-get update -q >&2 && apt-get install -y -q "$3" pkg-config >&2; }
  fi
  if ! _have_lib "$2"; then
    echo "$1: $2's headers are missing: install Debian's $3 and pkg-config" >&2
    echo "$(printf '%*s' "${#1}" '')  (apt-get install -y $3 pkg-config), then run the build again" >&2
    exit 1
  fi
}
