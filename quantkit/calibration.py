"""Calibration data: a registry of text sources turned into deterministic token batches.

Sources: `builtin:wiki` / `builtin:news` (real text packaged with gensim; the wiki pages used
for perplexity evaluation are held apart), local `.txt` / `.jsonl` / `.parquet` files, and
Hub datasets by name (real loaders; they need the network).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import CalibrationDataError

WHERE = "calibration.dataset"


def _builtin_wiki(_: str) -> list[str]:
    from quantkit.corpora import wiki_articles

    return wiki_articles("calib")


def _builtin_news(_: str) -> list[str]:
    from quantkit.corpora import news_texts

    return news_texts()


# Hub datasets: (dataset id, config, split, text field). Real loaders for users who are online.
HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "train", "article"),
    "pile": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
}


def _hub(name: str, max_docs: int = 5000) -> list[str]:
    from datasets import load_dataset

    repo, config, split, text_field = HUB_DATASETS[name]
    kwargs = {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}} if name == "c4" else {}
    try:
        ds = load_dataset(repo, config, split=split, streaming=True, **kwargs)
        return [row[text_field] for _, row in zip(range(max_docs), ds, strict=False) if row[text_field].strip()]
    except Exception as exc:
        raise CalibrationDataError(
            f"could not load Hub dataset '{name}' ({repo}): {str(exc).splitlines()[0][:200]}",
            where=WHERE,
            fix="check the network (HF_HUB_OFFLINE), or use builtin:wiki, builtin:news or a local .txt/.jsonl/.parquet",
        ) from exc


def _local_file(path_str: str, text_field: str) -> list[str]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise CalibrationDataError(f"calibration file '{path_str}' does not exist", where=WHERE,
                                   fix="give an existing .txt, .jsonl or .parquet file, or builtin:wiki")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        # Blank lines separate documents.
        texts = [t.strip() for t in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
    elif suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"line {lineno} is not valid JSON ({exc.msg})",
                                           where=f"{path}:{lineno}") from None
            if not isinstance(row, dict) or text_field not in row:
                raise CalibrationDataError(f"line {lineno} has no field '{text_field}'", where=f"{path}:{lineno}",
                                           fix="set calibration.text_field to the field that holds the text")
            texts.append(str(row[text_field]))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise CalibrationDataError(f"parquet file has no column '{text_field}' (columns: {table.column_names})",
                                       where=str(path), fix="set calibration.text_field")
        texts = [str(t) for t in table.column(text_field).to_pylist() if t is not None]
    else:
        raise CalibrationDataError(f"unsupported calibration file type '{suffix}'", where=WHERE,
                                   fix="use .txt (blank-line separated), .jsonl or .parquet")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationDataError(f"calibration file '{path_str}' holds no text", where=WHERE,
                                   fix="fill the file, or use builtin:wiki")
    return texts


BUILTIN_SOURCES: dict[str, Callable[[str], list[str]]] = {"wiki": _builtin_wiki, "news": _builtin_news}


def load_texts(dataset: str, text_field: str = "text") -> list[str]:
    if dataset.startswith("builtin:"):
        name = dataset.removeprefix("builtin:")
        if name not in BUILTIN_SOURCES:
            raise CalibrationDataError(f"unknown builtin dataset '{dataset}'", where=WHERE,
                                       fix=f"use one of: {', '.join('builtin:' + n for n in BUILTIN_SOURCES)}")
        return BUILTIN_SOURCES[name](name)
    if dataset in HUB_DATASETS:
        return _hub(dataset)
    if Path(dataset).suffix.lower() in {".txt", ".jsonl", ".parquet"} or Path(dataset).expanduser().exists():
        return _local_file(dataset, text_field)
    raise CalibrationDataError(
        f"'{dataset}' is neither a builtin dataset, a known Hub dataset, nor a local file", where=WHERE,
        fix=f"use builtin:wiki, builtin:news, one of {', '.join(HUB_DATASETS)}, or a .txt/.jsonl/.parquet path",
    )


CPU_AUTO_BATCH = 8  # batch_size auto without a GPU: memory is rarely the limit there, and 8 is the default


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [n_samples, seq_len]
    batch_size: int | str    # "auto" until quantize.resolve_batch_size measures it on the loaded model
    fingerprint: str         # sha256 of the token ids: identical data <=> identical fingerprint

    def with_batch_size(self, batch_size: int) -> CalibrationSet:
        return CalibrationSet(self.input_ids, max(1, min(int(batch_size), len(self.input_ids))), self.fingerprint)

    def batches(self) -> Iterator[torch.Tensor]:
        if not isinstance(self.batch_size, int):
            raise RuntimeError("calibration batch_size 'auto' must be resolved on the model first")
        for start in range(0, len(self.input_ids), self.batch_size):
            yield self.input_ids[start:start + self.batch_size]

    def __len__(self) -> int:
        if not isinstance(self.batch_size, int):
            raise RuntimeError("calibration batch_size 'auto' must be resolved on the model first")
        return (len(self.input_ids) + self.batch_size - 1) // self.batch_size


def build_calibration_set(texts: list[str], tokenizer, n_samples: int, seq_len: int, batch_size: int | str,
                          seed: int, dataset: str = "") -> CalibrationSet:
    """Shuffle documents with `seed`, join them with EOS, cut into `n_samples` windows of `seq_len`."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    need = n_samples * seq_len
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise CalibrationDataError(
            f"'{dataset}' has {len(stream)} tokens but n_samples x seq_len = {n_samples} x {seq_len} = {need}",
            where=WHERE, fix=f"lower calibration.n_samples to {max(1, len(stream) // seq_len)} or seq_len, or add text",
        )
    ids = torch.tensor(stream[:need], dtype=torch.long).view(n_samples, seq_len)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return CalibrationSet(ids, batch_size, digest)
