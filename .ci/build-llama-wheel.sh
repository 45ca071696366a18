#!/usr/bin/env bash
# Build (or reuse) a CPU llama-cpp-python wheel in a cache directory and print its path.
#
#   .ci/build-llama-wheel.sh            # builds the newest llama-cpp-python, or reuses a cached wheel
#   LLAMA_CPP_VERSION=0.3.36 .ci/build-llama-wheel.sh
#   pip install "$(.ci/build-llama-wheel.sh | tail -n1)"
#
# Environment:
#   WHEEL_CACHE        cache dir (default: $HOME/.cache/gemma-workbench/wheels)
#   LLAMA_CPP_VERSION  pin a version (default: any cached wheel, else the newest on the index)
#   PYTHON             interpreter whose pip builds the wheel (default: python3, or python)
#   CMAKE_ARGS         extra CMake flags, appended after ours (so they win). We always pass -DGGML_NATIVE=OFF:
#                      no -march=native, so the wheel does not depend on this machine's CPU. With NATIVE off
#                      ggml targets the x86-64-v3 baseline (SSE4.2/AVX/AVX2/FMA/F16C, no AVX-512), which every
#                      x86_64 CI runner of the last decade has; for older CPUs add
#                      CMAKE_ARGS="-DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_AVX=OFF".
#   LLAMA_CPP_SOURCE   build from a local sdist / source dir instead of the index (offline builds)
#   FORCE=1            rebuild even if a matching wheel is cached
#
# The build takes ~5-10 minutes on 2 cores (it compiles llama.cpp); the wheel tag says which Python/platform
# it fits ("py3-none-linux_x86_64": the extension is ctypes-loaded, so any CPython 3 on that platform).
# Idempotent: exits 0 and prints the cached wheel when one matches. Exits non-zero with a message on failure.
set -euo pipefail

die() { echo "build-llama-wheel: error: $*" >&2; exit 1; }

dir="${WHEEL_CACHE:-$HOME/.cache/gemma-workbench/wheels}"
version="${LLAMA_CPP_VERSION:-}"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if command -v python3 >/dev/null 2>&1; then py=python3
  elif command -v python >/dev/null 2>&1; then py=python
  else die "no python3/python on PATH (set PYTHON=/path/to/python)"; fi
fi
"$py" -m pip --version >/dev/null 2>&1 || die "'$py -m pip' does not work (set PYTHON to an interpreter with pip)"
mkdir -p "$dir" || die "cannot create wheel cache dir $dir"

arch="$(uname -m)"
os="$(uname -s | tr '[:upper:]' '[:lower:]')"

# A cached wheel matches if its version fits the pin (if any) and its platform tag fits this machine.
find_cached() {
  local pattern="llama_cpp_python-${version:-*}-*.whl" w best=""
  shopt -s nullglob
  for w in "$dir"/$pattern; do
    case "$w" in
      *-any.whl|*"${os}"*"${arch}"*.whl) best="$w" ;;  # glob order is sorted: the last is the newest
    esac
  done
  shopt -u nullglob
  [[ -n "$best" ]] && printf '%s\n' "$best"
  return 0
}

if [[ "${FORCE:-0}" != "1" ]]; then
  cached="$(find_cached)"
  if [[ -n "$cached" ]]; then
    echo "build-llama-wheel: reusing cached wheel" >&2
    printf '%s\n' "$cached"
    exit 0
  fi
fi

command -v cmake >/dev/null 2>&1 || echo "build-llama-wheel: note: no system cmake; pip's build isolation will fetch one" >&2
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || die "no C compiler (cc/gcc) on PATH; install build-essential"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || die "no C++ compiler (c++/g++) on PATH; install build-essential"

spec="${LLAMA_CPP_SOURCE:-llama-cpp-python${version:+==$version}}"
# Portable CPU build: no -march=native, no GPU backends.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF ${CMAKE_ARGS:-}"
export FORCE_CMAKE=1
jobs="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs}"

tmp="$(mktemp -d "$dir/.build.XXXXXX")" || die "cannot create a temp dir in $dir"
trap 'rm -rf "$tmp"' EXIT
echo "build-llama-wheel: building $spec with CMAKE_ARGS='$CMAKE_ARGS' (takes several minutes)" >&2
if ! "$py" -m pip wheel --no-deps --no-cache-dir -w "$tmp" "$spec" >&2; then
  die "pip wheel $spec failed (see the output above)"
fi

shopt -s nullglob
built=("$tmp"/llama_cpp_python-*.whl)
shopt -u nullglob
[[ ${#built[@]} -eq 1 ]] || die "expected one llama_cpp_python wheel in $tmp, found ${#built[@]}"
dest="$dir/$(basename "${built[0]}")"
mv -f "${built[0]}" "$dest" || die "cannot move the wheel to $dest"
echo "build-llama-wheel: wrote $dest" >&2
printf '%s\n' "$dest"
