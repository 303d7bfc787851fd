"""common/args.py: typed loading of nested dataclasses from YAML mappings, and the command line over it."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from hybrid_mamba.common.args import load_dataclass, parse_args, parse_known_args
from hybrid_mamba.common.cli import run_main


class SpecError(ValueError):
    pass


@dataclass
class Rule:
    kind: Literal["prose", "code"] = "prose"
    limits: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self):
        if "min" in self.limits and (self.limits["min"] or 0) < 0:
            raise SpecError("limits: min must not be negative")


@dataclass
class Item:
    name: str
    weight: float
    rule: Rule | None = field(default_factory=Rule)
    tags: list[str] = field(default_factory=list)


@dataclass
class Spec:
    items: list[Item]
    seed: int = 0


@dataclass
class CliArgs:
    """A command of three fields."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    max_steps: int = field(default=10, metadata={"help": "Optimizer steps."})
    precision: Literal["bf16", "fp32"] = field(default="fp32", metadata={"help": "Compute precision."})
    resume: bool = field(default=True, metadata={"help": "Resume from the newest checkpoint."})
    log_with: list[str] = field(default_factory=list, metadata={"help": "Trackers."})
    overrides: dict = field(default_factory=dict, metadata={"help": "A YAML mapping."})
    out_dir: str | None = field(default=None, metadata={"help": "Output folder."})

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}.")


def _load(data):
    return load_dataclass(Spec, data, error=SpecError)


def test_nested_loading_converts_and_fills_defaults():
    spec = _load(
        {
            "items": [
                {"name": "a", "weight": 1, "tags": "x", "rule": {"kind": "code", "limits": {"min": 2, "max": None}}},
                {"name": "b", "weight": 0.5, "rule": None},
            ]
        }
    )
    assert spec.seed == 0 and spec.items[0].weight == 1.0 and isinstance(spec.items[0].weight, float)
    assert spec.items[0].tags == ["x"] and spec.items[0].rule == Rule(kind="code", limits={"min": 2.0, "max": None})
    assert spec.items[1].rule is None and spec.items[1].tags == []


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"items": [{"name": "a", "weight": 1, "rule": {"kind": "prosee"}}]},
            "items[0].rule.kind: 'prosee' is not one of prose, code (did you mean 'prose'?)",
        ),
        (
            {"items": [{"name": "a", "weight": 1, "wieght": 2}]},
            "items[0]: unknown field 'wieght' (did you mean 'weight'?). Valid fields: name, weight, rule, tags",
        ),
        ({"items": [], "sed": 1}, "unknown field 'sed' (did you mean 'seed'?). Valid fields: items, seed"),
        ({"items": [{"name": "a", "weight": "heavy"}]}, "items[0].weight: expected a number, got 'heavy'"),
        ({"items": [{"name": "a", "weight": 1, "tags": [1]}]}, "items[0].tags[0]: expected a string, got 1"),
        ({"items": [{"name": "a"}]}, "items[0]: missing required field 'weight'"),
        ({"items": [{"name": "a", "weight": 1}], "seed": True}, "seed: expected an integer, got True"),
        (
            {"items": [{"name": "a", "weight": 1, "rule": {"limits": {"min": -1}}}]},
            "items[0].rule.limits: min must not be negative",
        ),
    ],
)
def test_loading_errors_name_the_field(data, message):
    with pytest.raises(SpecError) as e:
        _load(data)
    assert message in str(e.value)


def test_cli_overrides_yaml_and_flags_keep_their_spellings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 3e-4\nmax_steps: 5\nprecision: bf16\noverrides: {hidden_size: 32}\n")
    args = parse_args(CliArgs, ["--config", str(cfg), "--max-steps", "7", "--log_with", "a", "b", "--no_resume"])
    assert (args.learning_rate, args.max_steps, args.precision) == (3e-4, 7, "bf16")
    assert (args.log_with, args.resume, args.overrides) == (["a", "b"], False, {"hidden_size": 32})
    args = parse_args(CliArgs, ["--resume", "false", "--overrides", "{n: 1}", "--out-dir", "o"])
    assert (args.resume, args.overrides, args.out_dir) == (False, {"n": 1}, "o")


def test_unknown_fields_in_yaml_and_on_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_step: 3\n")
    with pytest.raises(
        ValueError, match=r"'max_step' \(did you mean 'max_steps'\?\) in .*c\.yaml\. Valid fields: .*learning_rate"
    ):
        parse_args(CliArgs, ["--config", str(cfg)])
    with pytest.raises(ValueError, match=r"'learning_rat' \(did you mean 'learning_rate'\?\) in the command line"):
        parse_args(CliArgs, ["--learning-rat", "1"])


def test_wrong_type_or_choice_in_yaml_names_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: many\n")
    with pytest.raises(ValueError, match=r"c\.yaml: max_steps: expected an integer, got 'many'"):
        parse_args(CliArgs, ["--config", str(cfg)])
    cfg.write_text("precision: bf61\n")
    with pytest.raises(
        ValueError, match=r"c\.yaml: precision: 'bf61' is not one of bf16, fp32 \(did you mean 'bf16'\?\)"
    ):
        parse_args(CliArgs, ["--config", str(cfg)])


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(CliArgs, ["--precision", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parse_args(CliArgs, ["--help"])
    assert e.value.code == 0 and "Peak learning rate." in capsys.readouterr().out


def test_post_init_error_is_one_line_through_run_main(capsys):
    from hybrid_mamba.trainers import (
        plan,  # PlanArgs.__post_init__ checks the sizes (a ValueError of this repository's code)
    )

    with pytest.raises(SystemExit) as e:
        run_main(plan.main, ["--preset", "tiny", "--gpus", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --gpus must be at least 1, got 0.\n"

    def main(argv):
        parse_args(CliArgs, argv)

    with pytest.raises(SystemExit) as e:
        run_main(main, ["--max_stepz", "3"])
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err.startswith("error: Unknown field(s) 'max_stepz' (did you mean 'max_steps'?)")
        and err.count("\n") == 1
    )


def test_parse_known_args_returns_the_rest():
    args, rest = parse_known_args(CliArgs, ["--max_steps", "3", "--seed", "1", "--log_with", "a"])
    assert (args.max_steps, args.log_with, rest) == (3, ["a"], ["--seed", "1"])
