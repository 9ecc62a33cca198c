# scripts/setup.sh: sourced by scripts/demo, scripts/test and the experiment scripts. Installs the
# Debian packages the build needs (only those missing), makes the project's Python environment
# (.venv: PyTorch, transformers and the test tools at the versions of python/requirements-dev.txt;
# .venv-kvpress for the kvpress test), and builds.
set -euo pipefail

LEVATTN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LEVATTN_PACKAGES=(g++ cmake make libopenblas-openmp-dev liblapacke-dev libgtest-dev
  libbenchmark-dev libcli11-dev nlohmann-json3-dev librandom123-dev libzip-dev
  python3-venv dataset-fashion-mnist fortunes openmpi-bin libopenmpi-dev
  clang libclang-rt-dev libomp-dev)  # clang's libFuzzer, sanitizer runtimes and OpenMP: the fuzz build
# The project's Python environment; LEVATTN_VENV=DIR puts it elsewhere.
LEVATTN_VENV="${LEVATTN_VENV:-$LEVATTN_ROOT/.venv}"
LEVATTN_PYTHON="$LEVATTN_VENV/bin/python"

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

# levattn_venv VENV REQUIREMENTS: creates VENV from LEVATTN_BASE_PYTHON, else python3.11 (the
# pinned PyTorch CPU wheel in the machines' cache is for 3.11), else python3 (3.10 or newer), and
# installs REQUIREMENTS (exact pins) into it, again only when that file has changed.
levattn_venv() {
  local venv="$1" req="$2" stamp="$1/.levattn-requirements"
  if [ ! -x "$venv/bin/python" ]; then
    local base="${LEVATTN_BASE_PYTHON:-}"
    if [ -z "$base" ]; then
      base=python3
      python3.11 -c 'import venv' 2>/dev/null && base=python3.11
    fi
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
      { echo "levattn: need Python 3.10 or newer as $base (LEVATTN_BASE_PYTHON=...)" >&2; return 1; }
    echo "levattn: creating the Python environment $venv ($("$base" --version 2>&1))" >&2
    "$base" -m venv "$venv"
  fi
  if ! cmp -s "$req" "$stamp"; then
    echo "levattn: installing ${req#"$LEVATTN_ROOT"/} into $venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" 2>&1 |
      grep -v "is ignored: it is neither a file nor a directory" >&2 || true
    "$venv/bin/python" -c 'import torch, numpy, pytest' ||
      { echo "levattn: the Python environment $venv is incomplete" >&2; return 1; }
    cp "$req" "$stamp"
  fi
}

# levattn_python_env: the project environment LEVATTN_VENV (python/requirements-dev.txt).
levattn_python_env() {
  levattn_venv "$LEVATTN_VENV" "$LEVATTN_ROOT/python/requirements-dev.txt"
  "$LEVATTN_PYTHON" -c 'import pybind11, scikit_build_core, transformers' ||
    { echo "levattn: the Python environment $LEVATTN_VENV is incomplete" >&2; return 1; }
}

# levattn_kvpress_env WHEEL: the kvpress test environment LEVATTN_KVPRESS_VENV (kvpress pins
# transformers < 5.3: python/requirements-kvpress.txt) with the levattn wheel WHEEL installed.
LEVATTN_KVPRESS_VENV="${LEVATTN_KVPRESS_VENV:-$LEVATTN_ROOT/.venv-kvpress}"
levattn_kvpress_env() {
  levattn_venv "$LEVATTN_KVPRESS_VENV" "$LEVATTN_ROOT/python/requirements-kvpress.txt"
  "$LEVATTN_KVPRESS_VENV/bin/python" -m pip install -q --no-deps --force-reinstall --disable-pip-version-check "$1"
}

# levattn_build DIR [cmake options...]: configure once, then build incrementally (a C++-only
# build: the sanitizer build, benchmarks by hand). The tests run the environment's python.
levattn_build() {
  local dir="$1"
  shift
  if [ ! -f "$dir/CMakeCache.txt" ]; then
    cmake -S "$LEVATTN_ROOT" -B "$dir" -DPython_EXECUTABLE="$LEVATTN_PYTHON" "$@" >/dev/null
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

# levattn_build_fuzz: the libFuzzer harnesses of fuzz/ (clang, ASan+UBSan, the library and the
# command line's code instrumented for coverage) in LEVATTN_FUZZ_BUILD; ctest -L fuzz runs each
# for a fixed number of inputs from a fixed seed (about a minute), LEVATTN_FUZZ_SECONDS at most
# (default 120).
LEVATTN_FUZZ_BUILD="${LEVATTN_FUZZ_BUILD:-$LEVATTN_ROOT/build-fuzz}"
levattn_build_fuzz() {
  [ -f "$LEVATTN_FUZZ_BUILD/CMakeCache.txt" ] &&
    cmake "$LEVATTN_FUZZ_BUILD" -DLEVATTN_FUZZ_SECONDS="${LEVATTN_FUZZ_SECONDS:-120}" >/dev/null
  CC=clang CXX=clang++ levattn_build "$LEVATTN_FUZZ_BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLEVATTN_FUZZ=ON \
    -DLEVATTN_BUILD_TESTS=OFF -DLEVATTN_BUILD_BENCHMARKS=OFF -DLEVATTN_BUILD_PYTHON=OFF -DLEVATTN_WITH_MPI=OFF \
    -DLEVATTN_FUZZ_SECONDS="${LEVATTN_FUZZ_SECONDS:-120}"
}

# levattn_build_package DIR: the Release build of everything (library, commands, extension,
# tests, benchmarks) in DIR, driven by scikit-build-core exactly as `pip install .` drives it:
# the wheel DIR/dist/levattn-*.whl, installed into the project environment (so `levattn` and
# `import levattn` there are the installed package). Incremental: a second run rebuilds nothing.
levattn_build_package() {
  local dir="$1" log="$1/build.log"
  mkdir -p "$dir"
  echo "levattn: building $dir (Release) and installing levattn into $LEVATTN_VENV" >&2
  rm -rf "$dir/dist"
  if ! CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$LEVATTN_PYTHON" -m pip wheel -v --no-deps --no-build-isolation --disable-pip-version-check \
      -w "$dir/dist" -C build-dir="$dir" -C cmake.define.LEVATTN_BUILD_TESTS=ON \
      -C cmake.define.LEVATTN_BUILD_BENCHMARKS=ON "$LEVATTN_ROOT" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "levattn: build failed (full log: $log)" >&2
    return 1
  fi
  grep -E 'warning:' "$log" | grep -v 'is ignored' | head -n 20 >&2 || true
  "$LEVATTN_PYTHON" -m pip install -q --no-deps --force-reinstall --disable-pip-version-check "$dir"/dist/levattn-*.whl
}
