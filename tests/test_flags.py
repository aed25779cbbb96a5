"""The flags: one per settings field, bounds and rules refused at start naming the flag, docs/flags.md current."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from predictor.config import (
    EngineConfig,
    ModelSource,
    ServerConfig,
    Settings,
    _add_section,
    build_parser,
    flags_markdown,
    parse_settings,
)
from predictor.request import Limits

SECTIONS = (ModelSource, Limits, EngineConfig, ServerConfig)
FLAGS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "flags.md"


def test_docs_flags_page_is_what_the_parser_says() -> None:
    assert FLAGS_PAGE.read_text(encoding="utf-8") == flags_markdown(), (
        "docs/flags.md differs from the parser: run `python -m predictor.config > docs/flags.md`"
    )


def test_the_docs_page_does_not_depend_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_DIR", "/elsewhere")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere/cache")
    page = flags_markdown()
    assert "/elsewhere" not in page
    assert "| `--model_dir` | $MODEL_DIR or /mnt/models |" in page


def test_each_settings_field_is_one_flag_in_its_sections_group() -> None:
    parser = build_parser()
    titles = {section.metadata["title"]: section.type for section in fields(Settings)}
    groups = {group.title: group for group in parser._action_groups if group.title in titles}
    assert list(groups) == list(titles)
    for cls in SECTIONS:
        (group,) = (group for group in groups.values() if group.description == inspect.cleandoc(cls.__doc__ or ""))
        expected = [f"--{f.name}" for f in fields(cls) if not f.metadata.get("kserve")]
        assert [action.option_strings[0] for action in group._group_actions] == expected
    # EngineConfig.model_name is KServe's --model_name, not a second flag.
    known = {option for action in parser._actions for option in action.option_strings}
    assert "--model_name" in known
    _, settings = parse_settings(["--model_name", "fox"])
    assert settings.model_name == settings.engine.model_name == "fox"
    # One default name, the one `make serve` and the README's examples use (KServe's own default is "model").
    assert parse_settings([])[1].model_name == "sd"


def test_choices_come_from_the_literal_types() -> None:
    actions = {action.dest: action for action in build_parser()._actions}
    assert actions["device"].choices == ("auto", "cuda", "cpu")
    assert actions["default_scheduler"].choices[0] == "auto"
    assert "heun" in actions["default_scheduler"].choices
    assert actions["lora_batching"].choices == ("mixed", "grouped")
    assert actions["max_steps"].choices is None


def test_flags_parse_to_typed_settings() -> None:
    _, settings = parse_settings(
        ["--max_sequence_length", "256", "--request_timeout_s", "12.5", "--compile", "--device", "cpu"]
    )
    assert settings.source.max_sequence_length == 256
    assert settings.engine.request_timeout_s == 12.5
    assert settings.engine.compile is True and settings.source.device == "cpu"


def _bounded_fields() -> list[tuple[str, str, str]]:
    """(flag, a value just outside one of its bounds, the bound's message) for every bound a field declares."""
    cases = []
    for cls in SECTIONS:
        for f in fields(cls):
            low, high = f.metadata.get("ge"), f.metadata.get("le")
            if low is not None and high is not None:
                within = f"must be within {low:g}..{high:g}"
                cases += [(f.name, str(low - 1), within), (f.name, str(high + 1), within)]
                continue
            if "gt" in f.metadata:
                cases.append((f.name, str(f.metadata["gt"]), f"must be > {f.metadata['gt']}"))
            if low is not None:
                cases.append((f.name, str(low - 1), f"must be >= {low}"))
            if high is not None:
                cases.append((f.name, str(high + 1), f"must be at most {high}"))
    return cases


@pytest.mark.parametrize(("name", "value", "message"), _bounded_fields())
def test_every_bound_is_refused_at_start_naming_the_flag(name: str, value: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings([f"--{name}", value])
    assert exited.value.code == 2
    assert f"--{name} {message}, got " in capsys.readouterr().err


def test_the_bounds_are_the_ones_requests_rely_on() -> None:
    """The ceilings the request schema is built on (a change of metadata that loosened them would show here)."""
    bounds = {f.name: dict(f.metadata) for cls in SECTIONS for f in fields(cls)}
    assert bounds["max_steps"]["le"] == 500 and bounds["max_image_size"]["ge"] == 64
    assert bounds["max_image_size"]["le"] == 4096 and bounds["default_guidance_scale"]["le"] == 30
    assert bounds["max_sequence_length"]["le"] == 512 and bounds["max_loras_per_request"]["le"] == 16
    assert bounds["max_queue"]["ge"] == 0 and bounds["torch_threads"]["ge"] == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--default_steps", "30", "--max_steps", "20"], "--default_steps must not exceed --max_steps"),
        (
            ["--max_batch_instances", "16", "--max_queue", "8"],
            "--max_queue must be at least --max_batch_instances, or large requests could never queue",
        ),
        (["--workers", "2"], "--workers must be 1: scale with replicas"),
    ],
)
def test_rules_between_flags_are_refused_at_start(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(flags)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_rules_hold_for_settings_made_in_code() -> None:
    with pytest.raises(ValueError, match="--max_steps must be > 0, got 0"):
        Settings(ModelSource(), Limits(max_steps=0), EngineConfig(), ServerConfig())
    with pytest.raises(ValueError, match=r"--max_loras_per_request \(4\) must not exceed it \(2\)"):
        Settings(ModelSource(lora_dir="/tmp"), Limits(), EngineConfig(compile=True, max_loaded_loras=2), ServerConfig())
    # Without --compile adapters are swapped in and out, so more may be named than are kept.
    Settings(ModelSource(lora_dir="/tmp"), Limits(), EngineConfig(max_loaded_loras=2), ServerConfig())


def test_help_shows_each_default_as_the_field_reads_it(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(default: $MODEL_DIR or /mnt/models)" in text
    assert "(default: the family's)" in text and "Within 64..4096. (default: 1024)" in text
    assert "FLUX.1" in text and "SD3" in text


def test_a_field_without_help_or_with_an_unknown_bound_is_refused() -> None:
    """A typo in the metadata (``lt`` for ``le``) would otherwise drop a bound without a word."""

    @dataclass(frozen=True)
    class Undocumented:
        """A section."""

        width: int = 1

    @dataclass(frozen=True)
    class Misspelt:
        """A section."""

        width: int = field(default=1, metadata={"help": "Width.", "lt": 10})

    for cls, message in ((Undocumented, "has no help text"), (Misspelt, r"unknown flag metadata \['lt'\]")):
        with pytest.raises(TypeError, match=message):
            _add_section(argparse.ArgumentParser(), cls, "test")
