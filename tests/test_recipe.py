"""Recipe schema: validation errors name the file, the field path and the line; overrides; round trip."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from quantkit.errors import RecipeError
from quantkit.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
GOOD = """\
metadata: {name: t}
model: {source: builtin:smollm2-135m-instruct}
quantize:
  method: int4_awq
  block_size: 64
calibration: {dataset: builtin:wiki, n_samples: 4, seq_len: 64}
export: {hf: true}
build: {}
evaluate: {tasks: [wiki_ppl]}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_recipes_validate():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.metadata.name
    assert load_recipe(REPO / "recipes" / "int4_awq.yaml").quantize.block_size == 64


def test_unknown_key_names_file_field_line_and_suggests(tmp_path):
    path = write(tmp_path, GOOD.replace("  block_size: 64", "  blok_size: 64"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:5" in msg and "quantize.blok_size" in msg and "did you mean 'block_size'" in msg


def test_wrong_type_names_field_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("n_samples: 4", "n_samples: many"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:6" in str(err.value) and "calibration.n_samples" in str(err.value)


def test_missing_section_is_an_error(tmp_path):
    path = write(tmp_path, GOOD.replace("build: {}\n", ""))
    with pytest.raises(RecipeError, match="field 'build': required field is missing"):
        load_recipe(path)


def test_impossible_values(tmp_path):
    with pytest.raises(RecipeError, match="power of two"):
        load_recipe(write(tmp_path, GOOD.replace("block_size: 64", "block_size: 100")))
    with pytest.raises(RecipeError, match=r"quantize.smoothquant_alpha.*does not apply to method 'int4_awq'"):
        load_recipe(write(tmp_path, GOOD.replace("block_size: 64", "smoothquant_alpha: 0.5")))
    with pytest.raises(RecipeError, match="unknown method 'int3'"):
        load_recipe(write(tmp_path, GOOD.replace("method: int4_awq", "method: int3")))
    with pytest.raises(RecipeError, match=r"max_seq_len"):
        load_recipe(write(tmp_path, GOOD.replace("build: {}", "build: {max_input_len: 2048, max_seq_len: 1024}")))


def test_bad_yaml_reports_line(tmp_path):
    path = write(tmp_path, GOOD.replace("export: {hf: true}", "export: {hf: true"))
    with pytest.raises(RecipeError, match=rf"{path}:\d+: not valid YAML"):
        load_recipe(path)


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["quantize.block_size=128", "evaluate.limit=5", "evaluate.tasks=[piqa, hellaswag]"])
    assert recipe.quantize.block_size == 128 and recipe.evaluate.limit == 5
    assert recipe.evaluate.tasks == ["piqa", "hellaswag"]
    with pytest.raises(RecipeError, match=r"\(from --set\).*calibration.seq_len"):
        load_recipe(path, ["calibration.seq_len=-3"])
    with pytest.raises(RecipeError, match=r"section\.field=value"):
        load_recipe(path, ["quantize.block_size"])


def test_import_merges_units_and_local_keys_win(tmp_path):
    write(tmp_path, "calibration: {dataset: builtin:news, n_samples: 16, seq_len: 32}\n", "unit.yaml")
    path = write(tmp_path, "$import: unit.yaml\n" + GOOD)
    recipe = load_recipe(path)
    assert recipe.calibration.dataset == "builtin:wiki" and recipe.calibration.n_samples == 4
    path = write(tmp_path, "$import: unit.yaml\n" + GOOD.replace(
        "calibration: {dataset: builtin:wiki, n_samples: 4, seq_len: 64}", "calibration: {n_samples: 2}"))
    recipe = load_recipe(path)
    c = recipe.calibration
    assert (c.dataset, c.n_samples, c.seq_len) == ("builtin:news", 2, 32)


def test_round_trip_to_yaml(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again.model_dump() == recipe.model_dump()
