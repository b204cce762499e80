#!/usr/bin/env bash
# Build Horovod from the PyPI sdist for the *installed* torch, cache the wheel, install it.
#
# Why: Horovod's last release (0.28.1, 2023) does not build against torch >= 2.1 as published: it asks
# for C++14 while torch 2.1+ needs C++17 and torch 2.15 needs C++20 (horovod issue #3996; the fix was
# merged but never released), and CMake 4 refuses its bundled gloo. This script applies those fixes.
#
# Usage:  bash launchers/install_horovod.sh            (python: $PYTHON, else the repo's .venv)
#         PYTHON=/path/to/python bash launchers/install_horovod.sh
# What it builds: PyTorch support with the gloo controller/CPU ops always; MPI when `mpicxx` is on PATH;
# NCCL GPU ops when torch sees a CUDA device and a CUDA toolkit (nvcc) and NCCL (header + library: from
# $HOROVOD_NCCL_HOME, the pip package nvidia-nccl that comes with torch, or the system) are present.
# With a CUDA build of torch and a toolkit present (even without a GPU), Horovod also compiles its CUDA
# kernels (it insists); with no toolkit it builds CPU-only, which works with a CUDA build of torch too.
#
# Idempotent and cached: the wheel goes to $DATKIT_WHEEL_CACHE (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/datkit/wheels/), in a folder named after the Horovod, torch and Python
# versions (+ machine and build flavour). A second run finds Horovod installed for this torch and does
# nothing; a new venv with the same versions installs the cached wheel in seconds; a new torch rebuilds.
# Knobs: HOROVOD_VERSION (0.28.1), HOROVOD_CXX_STANDARD (20), HOROVOD_INSTALL_GPU=0 (never build NCCL),
# HOROVOD_INSTALL_FORCE=1 (rebuild even when cached), MAKEFLAGS (default -j<cores>).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HV="${HOROVOD_VERSION:-0.28.1}"
CXX_STD="${HOROVOD_CXX_STANDARD:-20}"
CACHE="${DATKIT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/datkit/wheels}"
say() { echo "install_horovod: $*" >&2; }
WORK="" NCCL_LINKDIR=""
trap 'rm -rf ${WORK:+"$WORK"} ${NCCL_LINKDIR:+"$NCCL_LINKDIR"}' EXIT
die() { say "ERROR: $*"; exit 1; }

PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v "$PY" || true)"
[ -n "$PY" ] && [ -x "$PY" ] || die "no python at '${PYTHON:-$ROOT/.venv/bin/python}': set PYTHON=... or create the venv (source launchers/setup_env.sh)"
# torch's bin dir first on PATH: pip-installed cmake lands there, and horovodrun too.
export PATH="$(dirname "$PY"):$PATH"

# --- what is installed -------------------------------------------------------------------------------
read -r TORCH_V PY_TAG MACHINE TORCH_CUDA GPU <<<"$("$PY" - <<'EOF'
import platform, sys
try:
    import torch
except ImportError:
    print("none"); sys.exit(0)
cuda = torch.version.cuda or "none"
print(torch.__version__, f"cp{sys.version_info.major}{sys.version_info.minor}", platform.machine(),
      cuda, int(torch.cuda.is_available()))
EOF
)"
[ "$TORCH_V" != none ] || die "torch is not installed in $PY (install datkit first: source launchers/setup_env.sh)"

# MPI goes into the build when Open MPI's compiler wrapper is there; a Horovod built without it then does not count
# as installed (a machine that gained Open MPI after a gloo-only build rebuilds once, with both).
WANT_MPI=0
command -v mpicxx >/dev/null 2>&1 && WANT_MPI=1
installed_ok() {  # Horovod $HV importable, built for this very torch (its metadata.json records it), with MPI if wanted
  "$PY" - "$HV" "$WANT_MPI" <<'EOF' >/dev/null 2>&1
import json, os, sys
import horovod, torch
meta = json.load(open(os.path.join(os.path.dirname(horovod.__file__), "metadata.json")))
assert horovod.__version__ == sys.argv[1], horovod.__version__
assert meta.get("pytorch") == torch.__version__, meta
import horovod.torch as hvd
assert hvd.gloo_built()
assert sys.argv[2] != "1" or hvd.mpi_built(), "built without MPI"
EOF
}
if [ "${HOROVOD_INSTALL_FORCE:-0}" != 1 ] && installed_ok; then
  say "Horovod $HV for torch $TORCH_V already installed in $PY"
  exit 0
fi

# --- build flavour -----------------------------------------------------------------------------------
declare -a ENVS=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1
                 HOROVOD_WITHOUT_MXNET=1 CMAKE_POLICY_VERSION_MINIMUM=3.5
                 "MAKEFLAGS=${MAKEFLAGS:--j$(nproc 2>/dev/null || echo 2)}")
FLAVOUR=gloo
if [ "$WANT_MPI" = 1 ]; then
  # One build with both: under mpirun / srun Horovod's controller and CPU tensor operations are MPI (its
  # defaults once MPI is built); `horovodrun --gloo` sets HOROVOD_CONTROLLER=gloo HOROVOD_CPU_OPERATIONS=gloo.
  ENVS+=(HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=MPI); FLAVOUR+=-mpi
else
  ENVS+=(HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo)
fi
CUDA_DIR=""
if [ "$TORCH_CUDA" != none ]; then  # a CUDA build of torch: Horovod's CMake wants the toolkit if torch finds one
  NVCC_DIR=""  # nvcc on PATH may be a wrapper script: trust only a folder with bin/nvcc + include/cuda.h
  command -v nvcc >/dev/null 2>&1 && NVCC_DIR="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -V -r) "$NVCC_DIR"; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda.h" ]; then CUDA_DIR="$(readlink -f "$d")"; break; fi
  done
fi
if [ -n "$CUDA_DIR" ]; then
  ENVS+=("CUDA_HOME=$CUDA_DIR" "HOROVOD_CUDA_HOME=$CUDA_DIR"); FLAVOUR+=-cuda
  say "CUDA build of torch ($TORCH_CUDA), toolkit at $CUDA_DIR"
elif [ "$TORCH_CUDA" != none ]; then
  say "CUDA build of torch ($TORCH_CUDA) but no CUDA toolkit (nvcc) found: building Horovod CPU-only"
fi
if [ "$GPU" = 1 ] && [ -n "$CUDA_DIR" ] && [ "${HOROVOD_INSTALL_GPU:-1}" != 0 ]; then
  NCCL_INC="" NCCL_LIB=""
  if [ -n "${HOROVOD_NCCL_HOME:-}" ]; then
    NCCL_INC="$HOROVOD_NCCL_HOME/include"; NCCL_LIB="$(ls "$HOROVOD_NCCL_HOME"/lib*/libnccl.so* 2>/dev/null | head -1)"
  else  # the nvidia-nccl wheel torch depends on, else the system / toolkit
    read -r NCCL_INC NCCL_LIB <<<"$("$PY" - <<'EOF'
import glob, os
try:
    import nvidia.nccl as n
    root = list(n.__path__)[0]
    libs = sorted(glob.glob(os.path.join(root, "lib", "libnccl.so*")))
    if os.path.exists(os.path.join(root, "include", "nccl.h")) and libs:
        print(os.path.join(root, "include"), libs[0])
except ImportError:
    pass
EOF
)"
    if [ -z "$NCCL_INC" ]; then
      for inc in /usr/include "$CUDA_DIR/include"; do [ -f "$inc/nccl.h" ] && NCCL_INC="$inc" && break; done
      NCCL_LIB="$(ls /usr/lib/*-linux-gnu/libnccl.so* /usr/lib64/libnccl.so* "$CUDA_DIR"/lib*/libnccl.so* 2>/dev/null | head -1 || true)"
    fi
  fi
  if [ -n "$NCCL_INC" ] && [ -f "$NCCL_INC/nccl.h" ] && [ -n "$NCCL_LIB" ]; then
    NCCL_LINKDIR="$(mktemp -d)"; ln -s "$NCCL_LIB" "$NCCL_LINKDIR/libnccl.so"  # wheels ship only libnccl.so.2
    ENVS+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED "HOROVOD_NCCL_INCLUDE=$NCCL_INC"
           "HOROVOD_NCCL_LIB=$NCCL_LINKDIR"); FLAVOUR+=-nccl
    say "GPU found: NCCL ops (nccl.h in $NCCL_INC, $NCCL_LIB)"
  else
    say "GPU found but no NCCL header/library: GPU tensors will go through gloo (set HOROVOD_NCCL_HOME)"
  fi
fi

KEY="horovod-$HV-torch-$TORCH_V-$PY_TAG-$MACHINE-$FLAVOUR"
DEST="$CACHE/$KEY"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"                 # one build at a time per cache (parallel CI jobs, two shells)
command -v flock >/dev/null 2>&1 && flock 9

wheel_in() { ls "$1"/horovod-"$HV"-*.whl 2>/dev/null | head -1 || true; }
WHEEL="$(wheel_in "$DEST")"
if [ -z "$WHEEL" ] || [ "${HOROVOD_INSTALL_FORCE:-0}" = 1 ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
  LOG="$CACHE/$KEY.build.log"
  say "building Horovod $HV for torch $TORCH_V ($PY_TAG, $FLAVOUR): several minutes; log: $LOG"
  "$PY" -m pip --version >/dev/null || die "pip is missing in $PY"
  "$PY" -m pip install --quiet "setuptools>=64" packaging >/dev/null
  CMAKE_V="$(cmake --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -1 || true)"
  if [ -z "$CMAKE_V" ] || [ "$(printf '%s\n3.13\n' "$CMAKE_V" | sort -V | head -1)" != 3.13 ]; then
    say "no CMake >= 3.13 on PATH: pip install cmake into $PY's environment"
    "$PY" -m pip install --quiet "cmake>=3.18,<4"
  fi
  (cd "$WORK" && "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HV" -d .) \
    || die "could not download the horovod==$HV sdist from PyPI"
  tar -xzf "$WORK/horovod-$HV.tar.gz" -C "$WORK"
  SRC="$WORK/horovod-$HV"
  for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "$f: no 'set(CMAKE_CXX_STANDARD 14)' to patch (another Horovod version?)"
    sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $CXX_STD)/" "$f"
  done
  if ! env "${ENVS[@]}" "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$WORK/dist" "$SRC" >"$LOG" 2>&1; then
    tail -n 60 "$LOG" >&2
    die "the Horovod build failed (full log: $LOG)"
  fi
  BUILT="$(wheel_in "$WORK/dist")"
  [ -n "$BUILT" ] || die "pip wheel produced no horovod wheel (log: $LOG)"
  mkdir -p "$DEST.tmp.$$" && cp "$BUILT" "$DEST.tmp.$$/" && rm -rf "$DEST" && mv "$DEST.tmp.$$" "$DEST"
  WHEEL="$(wheel_in "$DEST")"
  say "cached $WHEEL"
else
  say "using the cached wheel $WHEEL"
fi

# --force-reinstall: an older Horovod of the same version built for another torch must be replaced;
# the second call installs its dependencies (cloudpickle, psutil, pyyaml, ...) if missing.
"$PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet "$WHEEL"
installed_ok || die "Horovod installed from $WHEEL but 'import horovod.torch' fails in $PY"
say "Horovod $HV installed in $PY (horovodrun --check-build):"
"$(dirname "$PY")/horovodrun" --check-build >&2 || true
