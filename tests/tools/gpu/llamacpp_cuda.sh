#!/usr/bin/env bash
# llama.cpp built with CUDA on the GPU machine (no internet, no pip there), then llama-bench pp512 / tg256 on an
# f16, a bf16 and a Q4_K_M GGUF of a random Gemma 3 270M checkpoint, and the same files through the workbench's
# own llama.cpp peer harness (llama-cpp-python's ctypes bindings over the CUDA libllama.so just built).
#
#   bash tests/tools/gpu/llamacpp_cuda.sh [all|build|bench|bench-wb]        (default: all)
#   (bench-wb: only wb.bench(peers=True) on the Q4_K_M file, the GGUFs made or reused: < 2 min)
#
# What it needs, carried to the card in CARRY (default out/llamacpp-carry; make it here with
# `bash tests/tools/gpu/llamacpp_cuda.sh carry`, which downloads from PyPI, so run that on the workstation):
#   llama-cpp-python-0.3.36-src-trim.tar.gz  the llama-cpp-python 0.3.36 sdist without its .git, docs, tests and
#                                            vocab files (8.7 MB; vendor/llama.cpp is llama.cpp itself, with
#                                            convert_hf_to_gguf.py and gguf-py)
#   diskcache-*.whl                          llama-cpp-python's one dependency missing on the card (pure Python)
#   llamacpp-cuda-bin.tar.gz.part*           optional: the binaries a previous `build` left in its $OUT; with them
#                                            the build is skipped
#   llamacpp-cuda-build.tar.gz.part*         optional: a build directory saved when the build ran out of time;
#                                            the build resumes from it
# Environment: OUT (default ./out/llamacpp-cuda), CARRY, LLAMA_SRC (another sdist .tar.gz or unpacked dir),
# JOBS (default 16), BUILD_BUDGET_S (default 480: the build is stopped and saved after that, so one device
# command of 10 minutes still returns it), PYTHON (default python3), ARCH (default 90).
# Exit status: 0 done; 3 cannot build here (no nvcc / cmake / compiler: the reason is printed); 4 the build ran
# out of time (saved to $OUT in parts: carry them back and run again); 5 the build failed; 6 no binaries to bench.
set -u -o pipefail

phase="${1:-all}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
OUT="${OUT:-$ROOT/out/llamacpp-cuda}"
CARRY="${CARRY:-$ROOT/out/llamacpp-carry}"
JOBS="${JOBS:-16}"
BUDGET="${BUILD_BUDGET_S:-480}"
PY="${PYTHON:-python3}"
ARCH="${ARCH:-90}"
W=/tmp/llamacpp-cuda          # fixed paths: a saved build directory only resumes at the same place
SRC_ROOT="$W/src"
BUILD="$W/build"
BIN="$W/bin"
MODELS="$W/models"
mkdir -p "$OUT" "$W"
LOG="$OUT/llamacpp.log"
MD="$OUT/llamacpp.md"
exec > >(tee -a "$LOG") 2>&1
say() { echo "$*"; echo "$*" >> "$MD"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

if [[ "$phase" == carry ]]; then
  # On the workstation: fetch the sdist and the wheel from PyPI and make the trimmed source tarball.
  mkdir -p "$CARRY" /tmp/llamacpp-sd
  "$PY" -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llamacpp-sd -q || exit 1
  "$PY" -m pip download --no-deps diskcache==5.6.3 -d "$CARRY" -q || exit 1
  rm -rf /tmp/llamacpp-sd/x && mkdir -p /tmp/llamacpp-sd/x && tar xzf /tmp/llamacpp-sd/llama_cpp_python-0.3.36.tar.gz -C /tmp/llamacpp-sd/x
  p=llama_cpp_python-0.3.36
  tar czf "$CARRY/$p-src-trim.tar.gz" -C /tmp/llamacpp-sd/x --exclude="$p/.git" --exclude="$p/docs" --exclude="$p/tests" \
    --exclude="$p/examples" --exclude="$p/vendor/llama.cpp/models" --exclude="$p/vendor/llama.cpp/docs" \
    --exclude="$p/vendor/llama.cpp/media" --exclude="$p/vendor/llama.cpp/tools/ui" \
    --exclude="$p/vendor/llama.cpp/tools/server/public*" --exclude="$p/vendor/llama.cpp/tests" \
    --exclude="$p/vendor/llama.cpp/benches" --exclude="$p/vendor/llama.cpp/.git*" "$p"
  ls -la "$CARRY"
  exit 0
fi

: > "$MD"
say "# llama.cpp with CUDA on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU visible')"
say ""
say "date: $(date -u '+%Y-%m-%d %H:%M UTC'), host cores: $(nproc), phase: $phase"

# ------------------------------------------------------------------ the toolchain
find_nvcc() {
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
  local c
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc; do
    [[ -x "$c" ]] && { echo "$c"; return; }
  done
}
NVCC="$(find_nvcc || true)"
can_build=1
why=()
if [[ -z "$NVCC" ]]; then can_build=0; why+=("no nvcc on PATH nor in /usr/local/cuda*/bin (the CUDA toolkit's compiler is needed for ggml-cuda)"); fi
command -v cmake >/dev/null 2>&1 || { can_build=0; why+=("no cmake on PATH"); }
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || { can_build=0; why+=("no C++ compiler (c++/g++)"); }
say "nvcc: ${NVCC:-none} $( [[ -n "$NVCC" ]] && "$NVCC" --version | grep -o 'release [0-9.]*' )"
say "cmake: $(cmake --version 2>/dev/null | head -1 || echo none); ninja: $(ninja --version 2>/dev/null || echo none); c++: $(c++ --version 2>/dev/null | head -1 || echo none)"
say "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || echo '?')"

# ------------------------------------------------------------------ the source
unpack_source() {
  local src="${LLAMA_SRC:-}"
  if [[ -z "$src" ]]; then
    for c in "$CARRY"/llama-cpp-python-*-src-trim.tar.gz "$CARRY"/llama-cpp-python-*.tar.gz "$CARRY"/llama_cpp_python-*.tar.gz \
             "$ROOT"/llama_cpp_python-*.tar.gz; do
      [[ -f "$c" ]] && { src="$c"; break; }
    done
  fi
  if [[ -z "$src" ]]; then
    say "CANNOT BUILD: no llama-cpp-python source found (set LLAMA_SRC, or carry $CARRY/llama-cpp-python-0.3.36-src-trim.tar.gz; make it with: bash tests/tools/gpu/llamacpp_cuda.sh carry)"
    return 1
  fi
  if [[ -d "$src" ]]; then
    LLAMA_PY_DIR="$src"
  else
    if [[ ! -f "$SRC_ROOT/.unpacked" ]]; then
      rm -rf "$SRC_ROOT" && mkdir -p "$SRC_ROOT" && tar xzf "$src" -C "$SRC_ROOT" || { say "CANNOT BUILD: could not unpack $src"; return 1; }
      touch "$SRC_ROOT/.unpacked"
    fi
    LLAMA_PY_DIR="$(ls -d "$SRC_ROOT"/llama_cpp_python-* | head -1)"
  fi
  LLAMA_DIR="$LLAMA_PY_DIR/vendor/llama.cpp"
  [[ -f "$LLAMA_DIR/CMakeLists.txt" || -f "$LLAMA_DIR/convert_hf_to_gguf.py" ]] || { say "no llama.cpp tree in $LLAMA_DIR"; return 1; }
  say "source: $src -> $LLAMA_DIR"
}

join_parts() {  # join_parts PREFIX DEST: cat PREFIX.part* > DEST when parts exist
  local parts=("$1".part*)
  [[ -e "${parts[0]}" ]] || return 1
  cat "${parts[@]}" > "$2"
}

save_parts() {  # save_parts FILE NAME: split FILE into <= 15 MiB parts $OUT/NAME.partNN (the device returns <= 16 MiB a file)
  local size
  size=$(stat -c %s "$1")
  if (( size > 60 * 1024 * 1024 )); then
    say "not saved: $2 is $((size / 1024 / 1024)) MiB (> 60 MiB; the device returns at most 64 MiB)"
    return 1
  fi
  split -b 15M -d "$1" "$OUT/$2.part"
  say "saved $2 ($((size / 1024 / 1024)) MiB) to \$OUT in $(ls "$OUT/$2".part* | wc -l) part(s): carry them back in $CARRY"
}

package_bins() {
  rm -rf "$BIN" && mkdir -p "$BIN"
  cp "$BUILD"/bin/llama-bench "$BUILD"/bin/llama-quantize "$BIN"/ 2>/dev/null
  find "$BUILD" -name '*.so*' \( -type f -o -type l \) -exec cp -a {} "$BIN"/ \;
  say "binaries and libraries: $(ls "$BIN" | tr '\n' ' ')"
  say "sizes: $(du -sh "$BIN" | cut -f1) unpacked"
  tar czf "$W/llamacpp-cuda-bin.tar.gz" -C "$W" bin && save_parts "$W/llamacpp-cuda-bin.tar.gz" llamacpp-cuda-bin.tar.gz
}

build() {
  unpack_source || return 3
  if join_parts "$CARRY/llamacpp-cuda-bin.tar.gz" "$W/prebuilt.tar.gz"; then
    rm -rf "$BIN" && tar xzf "$W/prebuilt.tar.gz" -C "$W" && say "build skipped: using the carried binaries ($(ls "$BIN" | wc -l) files)"
    return 0
  fi
  [[ -f "$LLAMA_DIR/CMakeLists.txt" ]] || { say "CANNOT BUILD: $LLAMA_DIR has no CMakeLists.txt (a source tree trimmed for benching only?)"; return 3; }
  if (( ! can_build )); then
    for w in "${why[@]}"; do say "CANNOT BUILD: $w"; done
    return 3
  fi
  export CUDACXX="$NVCC" PATH="$(dirname "$NVCC"):$PATH"
  if join_parts "$CARRY/llamacpp-cuda-build.tar.gz" "$W/build-saved.tar.gz"; then
    rm -rf "$BUILD" && tar xzf "$W/build-saved.tar.gz" -C "$W" && say "resuming the saved build directory"
  fi
  local gen=() t0 t1 t2 rc
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  t0=$(now)
  if [[ ! -f "$BUILD/CMakeCache.txt" ]]; then
    cmake -S "$LLAMA_DIR" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_APP=OFF > "$W/configure.log" 2>&1
    rc=$?
    if (( rc != 0 )); then tail -30 "$W/configure.log"; say "BUILD FAILED: cmake configure exited $rc (tail above)"; return 5; fi
  fi
  t1=$(now)
  say "configure: $(secs "$t0" "$t1") s; building llama-bench llama-quantize (-j$JOBS, CUDA arch $ARCH, budget ${BUDGET} s)"
  timeout "$BUDGET" cmake --build "$BUILD" --target llama-bench llama-quantize -j "$JOBS" > "$W/build.log" 2>&1
  rc=$?
  t2=$(now)
  if (( rc == 124 )); then
    say "build ran out of its ${BUDGET} s budget after $(secs "$t1" "$t2") s ($(grep -c '^\[' "$W/build.log") steps logged); saving the build directory"
    tar czf "$W/llamacpp-cuda-build.tar.gz" -C "$W" build && save_parts "$W/llamacpp-cuda-build.tar.gz" llamacpp-cuda-build.tar.gz
    return 4
  fi
  if (( rc != 0 )); then tail -40 "$W/build.log"; say "BUILD FAILED: exit $rc after $(secs "$t1" "$t2") s (tail above)"; return 5; fi
  say "BUILD TIME: $(secs "$t1" "$t2") s for llama-bench + llama-quantize + libllama/ggml-cuda on $(nproc) cores (-j$JOBS), configure $(secs "$t0" "$t1") s"
  package_bins
  return 0
}

# ------------------------------------------------------------------ the models and the benches
bench() {
  [[ -x "$BIN/llama-bench" ]] || { say "NO BINARIES: run the build first (or carry llamacpp-cuda-bin.tar.gz.part*)"; return 6; }
  [[ -n "${LLAMA_DIR:-}" ]] || unpack_source || return 6
  export LD_LIBRARY_PATH="$BIN:${LD_LIBRARY_PATH:-}"
  make_ggufs f16 bf16 || return 6
  bench_llama
  bench_wb
  return 0
}

make_ggufs() {  # make_ggufs TYPES...: the random 270M, its GGUFs of those types (f16/bf16) and Q4_K_M, reused if there
  mkdir -p "$MODELS"
  local t0 ty
  if [[ ! -f "$MODELS/r270/config.json" ]]; then
    t0=$(now)
    (cd "$ROOT" && "$PY" -c "import sys; sys.path.insert(0, '.'); from workbench import make_random as m; m.make_random('gemma3-270m', '$MODELS/r270', seed=0, dtype='bfloat16', progress=False)") \
      || { say "could not make the random 270M checkpoint"; return 6; }
    say "random Gemma 3 270M checkpoint (bfloat16, workbench make-random, seed 0): $(secs "$t0" "$(now)") s"
  fi
  for ty in "$@"; do
    if [[ ! -f "$MODELS/r270-$ty.gguf" ]]; then
      t0=$(now)
      "$PY" "$ROOT/tests/tools/gpu/hf_to_gguf_synthvocab.py" "$LLAMA_DIR" "$MODELS/r270" --outtype "$ty" \
        --outfile "$MODELS/r270-$ty.gguf" > "$W/convert-$ty.log" 2>&1 \
        || { tail -20 "$W/convert-$ty.log"; say "convert_hf_to_gguf.py --outtype $ty failed (tail above)"; }
      [[ -f "$MODELS/r270-$ty.gguf" ]] && say "GGUF $ty: $(du -h "$MODELS/r270-$ty.gguf" | cut -f1) in $(secs "$t0" "$(now)") s (llama.cpp's convert_hf_to_gguf.py, synthetic vocabulary)"
    fi
  done
  if [[ -f "$MODELS/r270-f16.gguf" && ! -f "$MODELS/r270-q4km.gguf" ]]; then
    t0=$(now)
    "$BIN/llama-quantize" "$MODELS/r270-f16.gguf" "$MODELS/r270-q4km.gguf" Q4_K_M > "$W/quantize.log" 2>&1 \
      || { tail -20 "$W/quantize.log"; say "llama-quantize Q4_K_M failed (tail above)"; }
    [[ -f "$MODELS/r270-q4km.gguf" ]] && say "GGUF Q4_K_M: $(du -h "$MODELS/r270-q4km.gguf" | cut -f1) in $(secs "$t0" "$(now)") s (llama-quantize)"
  fi
}

py_deps() {     # pure-Python wheels carried (diskcache for the bindings, gguf for the workbench's GGUF reader): zips
  mkdir -p "$W/py"
  local whl
  for whl in "$CARRY"/diskcache-*.whl "$CARRY"/gguf-*.whl; do
    [[ -f "$whl" ]] && "$PY" -m zipfile -e "$whl" "$W/py"
  done
  ln -sfn "$BIN" "$LLAMA_PY_DIR/llama_cpp/lib"     # the bindings look for their libraries there (_ggml.py always)
}

bench_llama() {
  local ty ms=()
  for ty in f16 bf16 q4km; do [[ -f "$MODELS/r270-$ty.gguf" ]] && ms+=(-m "$MODELS/r270-$ty.gguf"); done
  (( ${#ms[@]} )) || { say "no GGUF to bench"; return 6; }
  say ""
  say "## llama-bench (pp512, tg256, all layers on the GPU, flash attention off/on, 5 repeats)"
  say ""
  "$BIN/llama-bench" "${ms[@]}" -p 512 -n 256 -ngl 99 -fa off,on -r 5 -o md > "$W/llama-bench.md" 2> "$W/llama-bench.err"
  local rc=$?
  cat "$W/llama-bench.md" | tee -a "$MD" >/dev/null; cat "$W/llama-bench.md"
  (( rc == 0 )) || { tail -20 "$W/llama-bench.err"; say "llama-bench exited $rc (stderr tail above)"; }
  grep -iE 'CUDA|ggml_cuda|found [0-9]+ CUDA' "$W/llama-bench.err" | head -5 | while read -r l; do say "    $l"; done

  say ""
  say "## The workbench's llama.cpp peer harness (LlamaCppReference.bench: one eval per token, pp512/tg256, 3 repeats)"
  say ""
  py_deps
  LLAMA_CPP_LIB_PATH="$BIN" PYTHONPATH="$ROOT:$LLAMA_PY_DIR:$W/py:${PYTHONPATH:-}" "$PY" - "${ms[@]}" <<'PYEOF' 2>&1 | tee -a "$MD"
import sys
paths = [a for a in sys.argv[1:] if a != "-m"]
try:
    import llama_cpp
    from workbench.references.llamacpp import LlamaCppReference
except Exception as e:
    print(f"llama-cpp-python over the CUDA build did not import: {type(e).__name__}: {e}")
    sys.exit(0)
print(f"llama_cpp {llama_cpp.__version__} from {llama_cpp.__file__}; GPU offload: {llama_cpp.llama_supports_gpu_offload()}")
print()
print("| GGUF | pp512 tok/s | tg256 tok/s |")
print("| --- | ---: | ---: |")
for p in paths:
    try:
        ref = LlamaCppReference(p, n_ctx=512 + 256 + 16, n_gpu_layers=-1)
        r = ref.bench(512, 256, 3)
        ref.close()
        print(f"| {p.rsplit('/', 1)[-1]} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    except Exception as e:
        print(f"| {p.rsplit('/', 1)[-1]} | failed: {type(e).__name__}: {str(e)[:150]} | |")
PYEOF
}

bench_wb() {
  # bench --peers on the Q4_K_M file: the workbench (torch:cuda, dequantised to bfloat16) and llama.cpp on the GPU
  # in the same call, through the same CUDA libllama.so
  local q="$MODELS/r270-q4km.gguf"
  if [[ -f "$q" ]]; then
    say ""
    say "## wb.bench(peers=True) on the Q4_K_M GGUF, torch:cuda bfloat16 vs llama.cpp:gpu (WORKBENCH_PEERS=llama.cpp)"
    say ""
    WORKBENCH_PEERS=llama.cpp LLAMA_CPP_LIB_PATH="$BIN" PYTHONPATH="$ROOT:$LLAMA_PY_DIR:$W/py:${PYTHONPATH:-}" \
      timeout "${PEERS_TIMEOUT_S:-240}" "$PY" -c "
import workbench as wb
r = wb.bench('$q', backends=['torch:cuda'], dtypes=['bfloat16'], prompt_len=512, gen_len=256, repeats=3, peers=True,
             db='$W/runs.sqlite', progress=False)
print('\`\`\`'); print(r.table()); print('\`\`\`')
" 2>&1 | tail -40 | tee -a "$MD" || say "wb.bench on the GGUF did not finish (exit $?)"
  fi
}

rc=0
case "$phase" in
  build) build; rc=$? ;;
  bench) if join_parts "$CARRY/llamacpp-cuda-bin.tar.gz" "$W/prebuilt.tar.gz"; then rm -rf "$BIN"; tar xzf "$W/prebuilt.tar.gz" -C "$W"; fi
         bench; rc=$? ;;
  all) build; rc=$?; if (( rc == 0 )); then bench; rc=$?; fi ;;
  bench-wb)   # only the wb.bench(peers) step on the Q4_K_M file (its GGUFs made or reused): < 2 min
    if join_parts "$CARRY/llamacpp-cuda-bin.tar.gz" "$W/prebuilt.tar.gz"; then rm -rf "$BIN"; tar xzf "$W/prebuilt.tar.gz" -C "$W"; fi
    if [[ -x "$BIN/llama-quantize" ]] && unpack_source; then
      export LD_LIBRARY_PATH="$BIN:${LD_LIBRARY_PATH:-}"
      make_ggufs f16 && { py_deps; bench_wb; }; rc=$?
    else say "NO BINARIES or no source: carry llamacpp-cuda-bin.tar.gz.part* and the trimmed sdist"; rc=6; fi ;;
  *) echo "usage: $0 [all|build|bench|bench-wb|carry]"; exit 2 ;;
esac
say ""
say "exit status $rc"
exit $rc
