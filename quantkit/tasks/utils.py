"""Helpers the task YAMLs call through `!function utils.<name>`.

Copied next to the generated YAMLs by `quantkit.evaluate`; each one mirrors the helper of lm-eval's
built-in task of the same name, so scores compare with published lm-eval numbers.
"""

from __future__ import annotations

import re


def _hellaswag_clean(text: str) -> str:
    # WikiHow items carry "[title]"-style markers; lm-eval removes them the same way.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    def _process(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process)


def winogrande_doc_to_text(doc: dict) -> int:
    # Multiple "contexts" (one per option), one shared continuation: the gold index picks the context.
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def wiki_process_results(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"].strip()))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
