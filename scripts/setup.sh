# scripts/setup.sh: sourced by scripts/demo and scripts/test. Installs the Debian packages the
# build needs (only those missing), then configures and builds one build directory.
set -euo pipefail

LEVATTN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LEVATTN_PACKAGES=(g++ cmake make libopenblas-openmp-dev liblapacke-dev libgtest-dev
  libbenchmark-dev libcli11-dev nlohmann-json3-dev librandom123-dev libzip-dev zlib1g-dev
  python3-numpy python3-dev pybind11-dev python3-torch python3-pytest dataset-fashion-mnist
  openmpi-bin libopenmpi-dev)

levattn_install_packages() {
  local missing=()
  for p in "${LEVATTN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "levattn: installing ${missing[*]}" >&2
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "levattn: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# levattn_build DIR [cmake options...]: configure once, then build incrementally.
levattn_build() {
  local dir="$1"
  shift
  if [ ! -f "$dir/CMakeCache.txt" ]; then
    cmake -S "$LEVATTN_ROOT" -B "$dir" "$@" >/dev/null
  fi
  local log="$dir/build.log"
  echo "levattn: building $dir" >&2
  if ! cmake --build "$dir" --parallel "$(nproc)" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "levattn: build failed (full log: $log)" >&2
    return 1
  fi
  grep -E 'warning:' "$log" | head -n 20 >&2 || true
}

# levattn_register_python BUILD_DIR: makes `import levattn` (for /usr/bin/python3) find the package
# built in BUILD_DIR/python, through a .pth file in this user's site-packages.
levattn_register_python() {
  local pkg="$1/python"
  [ -f "$pkg/levattn/__init__.py" ] || return 0
  local site
  site="$(/usr/bin/python3 -c 'import site; print(site.getusersitepackages())')"
  mkdir -p "$site"
  if [ "$(cat "$site/levattn.pth" 2>/dev/null)" != "$pkg" ]; then
    echo "$pkg" >"$site/levattn.pth"
    echo "levattn: /usr/bin/python3 imports levattn from $pkg (via $site/levattn.pth)" >&2
  fi
}
