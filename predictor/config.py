"""Command-line flags (KServe's own plus this server's) and the frozen settings built from them.

Each flag of this server is one field of a settings section (``ModelSource``, ``Limits``, ``EngineConfig``,
``ServerConfig``), written once. The flag's name, type, default and choices come from the field and its
annotation (``X | None`` takes X; a ``Literal`` gives the choices); the rest from the field's metadata:

- ``help``: what the flag does (required);
- ``gt`` / ``ge`` / ``le``: bounds, checked when ``Settings`` is made, so a value outside them stops the start
  with a message naming the flag;
- ``default_text``: how the default reads where it depends on the environment or means "the family's";
- ``kserve``: the value comes from KServe's own flag of the same name, so no flag is made for it.

``build_parser`` makes one argument group per section, titled by the ``Settings`` field that holds it and
described by the section's docstring. ``python -m predictor.config`` writes docs/flags.md from that parser.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import types
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from predictor.request import MAX_T5_TOKENS, Limits

Device = Literal["auto", "cuda", "cpu"]
Dtype = Literal["auto", "float16", "bfloat16", "float32"]
StorageDtype = Literal["auto", "float8_e4m3fn", "float8_e5m2"]
SafetyChecker = Literal["checkpoint", "on", "off"]
CompileMode = Literal["reduce-overhead", "default", "max-autotune-no-cudagraphs"]
LoraBatching = Literal["mixed", "grouped"]

API_KEYS_ENV = "PREDICTOR_API_KEYS"
METADATA_KEYS = frozenset({"help", "gt", "ge", "le", "default_text", "kserve"})


@dataclass(frozen=True)
class ModelSource:
    """Where the pipeline comes from and how it is placed; the LoRA adapters requests may name."""

    model_dir: str = field(
        default_factory=lambda: os.environ.get("MODEL_DIR", "/mnt/models"),
        metadata={
            "help": "Directory with a diffusers pipeline (model_index.json), used first when it holds one; KServe's "
            "storage initializer puts storageUri weights here.",
            "default_text": "$MODEL_DIR or /mnt/models",
        },
    )
    model_id: str = field(
        default="CompVis/stable-diffusion-v1-4",
        metadata={
            "help": "Used when --model_dir holds no pipeline: a Hugging Face repo id of a served family (SD 1.x/2.x, "
            "SDXL, FLUX.1, SD3/3.5 and their variants), or builtin:NAME, random weights made offline "
            "(builtin:tiny and its kin run in seconds on a CPU, for tests; the builtin:*-arch ones are full-size "
            "architectures, for GPU benchmarks; an unknown name is answered with the list)."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of --model_id."})
    variant: str = field(
        default="auto",
        metadata={
            "help": "Weight files to load: auto reads the fp16 variant (*.fp16.safetensors, half the bytes of the "
            "plain float32 files) for a float16 load when every component has it, else the plain files; none: "
            "always the plain files; any other name (fp16, bf16, ...): that variant."
        },
    )
    device: Device = field(default="auto", metadata={"help": "auto: CUDA when present, else the CPU."})
    dtype: Dtype = field(
        default="auto",
        metadata={
            "help": "auto: on CUDA the family's (float16, or bfloat16 where float16 overflows, as for FLUX.1 and "
            "SD3); float32 on the CPU."
        },
    )
    storage_dtype: StorageDtype = field(
        default="auto",
        metadata={
            "help": "Keep the denoiser's weights (the UNet or transformer) in this dtype and compute in --dtype, each "
            "layer cast as it runs (diffusers' enable_layerwise_casting): float8 halves a bfloat16 transformer's "
            "memory (the README's families table says what each model needs) for some speed. The text encoders "
            "and the VAE keep --dtype. auto: --dtype. Not with --compile or --lora_dir yet."
        },
    )
    offload_text_encoders: bool = field(
        default=False,
        metadata={
            "help": "Keep the text encoders' weights in host memory and stream them to the GPU layer by layer while "
            "they encode (diffusers' group offloading, on a CUDA stream): the GPU holds the denoiser and the VAE "
            "only, and each batch of prompts reads the encoders over PCIe once (FLUX.2-dev's 48 GB Mistral encoder "
            "on an 80 GB GPU). Images are unchanged. The pipeline is then loaded in host memory first."
        },
    )
    safety_checker: SafetyChecker = field(
        default="checkpoint",
        metadata={
            "help": "checkpoint: run the safety checker when the checkpoint ships one; on: require it; off: never "
            "run it. Flagged images are answered black with nsfw: true."
        },
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={
            "help": "Models with a T5 text encoder: its prompt window in tokens (the family's by default, as "
            "diffusers sets it: FLUX.1 512, SD3 256). Longer prompts are cut and answered prompt_truncated: true. "
            "Refused for models without T5.",
            "gt": 0,
            "le": MAX_T5_TOKENS,
            "default_text": "the family's",
        },
    )
    preview_vae_dir: str | None = field(
        default=None,
        metadata={
            "help": "A tiny VAE saved by diffusers (AutoencoderTiny: madebyollin's taesd, taesdxl, taef1 or taesd3, "
            "the one made for the family) that decodes streamed previews at full size. Without it, previews come "
            "from a linear latent-to-RGB map fitted to the model's own VAE (no extra weights, 1/8 the resolution, "
            "scaled up)."
        },
    )
    lora_dir: str | None = field(
        default=None,
        metadata={
            "help": "A directory of LoRA adapters (.safetensors, in any format diffusers' load_lora_weights reads: "
            "diffusers/PEFT, kohya) that requests name in 'loras' by file name without the suffix. Read at start; "
            "files that cannot be used are listed with the reason (GET /v1/models/NAME/loras)."
        },
    )
    max_lora_bytes: int = field(
        default=1024**3,
        metadata={"help": "Largest adapter file served; larger ones are refused at start.", "gt": 0},
    )


@dataclass(frozen=True)
class EngineConfig:
    """How images are batched, queued and timed out in the denoising loop; torch.compile; adapters in the model."""

    # KServe's --model_name: the engine labels its metrics with it.
    # "sd" by default (KServe's is "model"): the name `make serve`, the README's examples and the CLI use.
    model_name: str = field(default="sd", metadata={"kserve": True})
    max_batch_size: int = field(
        default=8, metadata={"help": "Most images in one denoiser (UNet or transformer) call; 1: serial.", "gt": 0}
    )
    max_queue: int = field(
        default=32,
        metadata={
            "help": "Most images waiting for a batch slot, at least --max_batch_instances; beyond it, 503 overloaded.",
            "ge": 0,
        },
    )
    request_timeout_s: float | None = field(
        default=300.0,
        metadata={
            "help": "A request still unfinished after this many seconds gets 504 and its work stops; keep it below "
            "Knative's timeout.",
            "gt": 0,
        },
    )
    torch_threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0: torch's default.", "ge": 0})
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the denoiser and the VAE decoder before the model reports ready (minutes the "
            "first time; keep --compile_cache_dir so restarts reuse the result). With --lora_dir the denoiser is "
            "compiled with and without adapters."
        },
    )
    compile_mode: CompileMode = field(
        default="reduce-overhead",
        metadata={
            "help": "torch.compile mode of the denoiser: reduce-overhead replays CUDA graphs on CUDA (recorded at "
            "start for batches of 2, 4, 8, ... rows; on a CPU the same as default); default compiles without them; "
            "max-autotune-no-cudagraphs also tunes kernels."
        },
    )
    compile_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend: inductor; eager for tests."}
    )
    max_loaded_loras: int = field(
        default=8,
        metadata={
            "help": "Adapters kept in the model at once; past it the least recently used one no running image needs "
            "is taken out (a file is read again when next named). With --compile, the number of fixed slots each "
            "changed layer holds (an image whose adapters find no free slot waits for one).",
            "gt": 0,
        },
    )
    lora_batching: LoraBatching = field(
        default="mixed",
        metadata={
            "help": "mixed: images with different adapters (and none) share every denoiser call, each row with its "
            "own adapters; grouped: images share a call only with the same adapters and scales."
        },
    )


@dataclass(frozen=True)
class ServerConfig:
    """The process around the engine: start-up and warm-up, liveness, shutdown, the HTTP listener's limits, request
    bodies, API keys."""

    warmup_steps: int = field(
        default=2,
        metadata={"help": "Steps of the warm-up image made before the model reports ready; 0: none.", "ge": 0},
    )
    grace_period_s: int = field(
        default=30,
        metadata={
            "help": "On SIGTERM, how long in-flight requests may take to finish; past it each is answered 503 "
            "shutting_down (a stream gets an error event) and the process exits within a few seconds. A second "
            "SIGTERM stops at once.",
            "gt": 0,
        },
    )
    max_body_bytes: int = field(
        default=1024 * 1024,
        metadata={
            "help": "Largest request body on the routes without input images; larger ones get 413 before they are "
            "read whole.",
            "gt": 0,
        },
    )
    max_image_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata={
            "help": "Largest request body on the routes that take input images (/generate, v1 :predict, v2 /infer, "
            "/v1/images/edits); base64 makes an image a third larger.",
            "gt": 0,
        },
    )
    max_header_bytes: int = field(
        default=64 * 1024,
        metadata={
            "help": "Largest request line plus headers; a larger one gets 431 and its connection is closed.",
            "ge": 1024,
        },
    )
    header_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "Time a client has to send a request's line and headers, from its first byte (or from "
            "connecting); past it 408 and the connection is closed (slow or silent clients hold no connection).",
            "gt": 0,
        },
    )
    body_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "Longest pause between two parts of a request body; past it 408, the connection is closed and "
            "the request dropped.",
            "gt": 0,
        },
    )
    max_connections: int = field(
        default=1024,
        metadata={
            "help": "Open HTTP connections served at once; a request on a connection past the cap gets 503. Idle "
            "kept-alive connections count until --timeout-keep-alive closes them.",
            "gt": 0,
        },
    )
    compile_cache_dir: str = field(
        default_factory=lambda: os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor"),
        metadata={
            "help": "With --compile: the persistent compile cache (sets TORCHINDUCTOR_CACHE_DIR and "
            "TRITON_CACHE_DIR). Keep it on a volume or in the image so a restarted pod skips compiling.",
            "default_text": "$TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor",
        },
    )
    load_timeout_s: float = field(
        default=1800.0,
        metadata={
            "help": "Liveness (/livez) fails when loading, compiling and warming up take longer, so a hung download "
            "or compile gets the pod restarted; readiness waits for the load either way.",
            "gt": 0,
        },
    )
    api_key_file: str | None = field(
        default=None,
        metadata={
            "help": f"File of API keys, one per line (# starts a comment). When set, or when ${API_KEYS_ENV} holds "
            "keys (one per line or comma-separated, e.g. from a Secret), every POST route (v1, v2, /generate, the "
            "OpenAI routes) needs 'Authorization: Bearer KEY'; health, readiness, metrics and the playground page "
            "stay open."
        },
    )


@dataclass(frozen=True)
class Settings:
    """The four sections, each an argument group of the flags (titled by the field's metadata)."""

    source: ModelSource = field(metadata={"title": "model"})
    limits: Limits = field(metadata={"title": "request limits"})
    engine: EngineConfig = field(metadata={"title": "engine"})
    server: ServerConfig = field(metadata={"title": "server"})

    def __post_init__(self) -> None:
        """Every value within its field's bounds, then the rules between flags: ValueError naming the flag.
        Sections made in code alone (tests, benchmarks) are trusted; what comes from the command line passes here."""
        for section in self.sections():
            check_bounds(section)
        source, limits, engine = self.source, self.limits, self.engine
        if limits.default_steps > limits.max_steps:
            raise ValueError("--default_steps must not exceed --max_steps")
        if source.lora_dir is not None and engine.compile and limits.max_loras_per_request > engine.max_loaded_loras:
            raise ValueError(
                "with --compile, adapters live in --max_loaded_loras fixed slots: --max_loras_per_request "
                f"({limits.max_loras_per_request}) must not exceed it ({engine.max_loaded_loras})"
            )
        if source.storage_dtype != "auto" and engine.compile:
            raise ValueError("--storage_dtype with --compile: layerwise casting is not compiled yet; choose one")
        if engine.max_queue < limits.max_batch_instances:
            raise ValueError("--max_queue must be at least --max_batch_instances, or large requests could never queue")

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def sections(self) -> tuple[Any, ...]:
        return tuple(getattr(self, section.name) for section in fields(self))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """Settings from parsed flags (ValueError when a value or a combination is refused)."""
        hints = get_type_hints(cls)
        return cls(**{section.name: _from_namespace(hints[section.name], args) for section in fields(cls)})


def _from_namespace(cls: type, args: argparse.Namespace) -> Any:
    """An instance of section ``cls`` from the flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def check_bounds(section: Any) -> None:
    """ValueError naming the flag when a field of ``section`` lies outside its ``gt`` / ``ge`` / ``le`` bounds
    (written so that NaN fails every bound)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if value is None:
            continue
        above, low, high = f.metadata.get("gt"), f.metadata.get("ge"), f.metadata.get("le")
        flag = f"--{f.name}"
        if low is not None and high is not None:
            if not low <= value <= high:
                raise ValueError(f"{flag} must be within {_number(low)}..{_number(high)}, got {_number(value)}")
            continue
        if above is not None and not value > above:
            raise ValueError(f"{flag} must be > {_number(above)}, got {_number(value)}")
        if low is not None and not value >= low:
            raise ValueError(f"{flag} must be >= {_number(low)}, got {_number(value)}")
        if high is not None and not value <= high:
            raise ValueError(f"{flag} must be at most {_number(high)}, got {_number(value)}")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


DESCRIPTION = (
    "Serve a diffusers image model with KServe: SD 1.x and 2.x, SDXL (each with their Turbo, LCM and inpainting "
    "checkpoints), FLUX.1 schnell and dev, SD3 and 3.5. Routes: KServe v1 and v2, POST /generate and the OpenAI "
    "Images API (generations and edits)."
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """This server's flags show their default as the settings field reads it; KServe's as argparse writes it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = getattr(action, "shown_default", None)
        if shown is None:
            return super()._get_help_string(action)
        return f"{action.help} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    # Importing kserve.model_server parses sys.argv for KServe's flags; that is its design.
    from kserve import model_server

    parser = argparse.ArgumentParser(
        prog="python -m predictor",
        description=DESCRIPTION,
        parents=[model_server.parser],
        formatter_class=_HelpFormatter,
    )
    # gRPC serves no image route here; turn it on explicitly if wanted. The per-request latency line is
    # opt-in: uvicorn's access log already says what happened, and /metrics has the timings.
    parser.set_defaults(enable_grpc=False, enable_latency_logging=False, model_name="sd")
    hints = get_type_hints(Settings)
    for section in fields(Settings):
        _add_section(parser, hints[section.name], section.metadata["title"])
    return parser


def _add_section(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One argument group: a flag for each field of settings section ``cls``."""
    group = parser.add_argument_group(title, inspect.cleandoc(cls.__doc__ or ""))
    hints = get_type_hints(cls)
    for f in fields(cls):
        unknown = set(f.metadata) - METADATA_KEYS
        if unknown:
            raise TypeError(f"{cls.__name__}.{f.name}: unknown flag metadata {sorted(unknown)}")
        if f.metadata.get("kserve"):
            continue
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help text")
        value = _field_default(f)
        kind, choices = _value_type(hints[f.name])
        flag, text = f"--{f.name}", f.metadata["help"] + _upper_bound_text(f.metadata)
        if kind is bool:
            if value:
                raise TypeError(f"{cls.__name__}.{f.name}: a flag that is on by default could not be turned off")
            action = group.add_argument(flag, action="store_true", default=False, help=text)
        else:
            action = group.add_argument(flag, type=kind, choices=choices, default=value, help=text)
        action.shown_default = _shown_default(f, value)  # read by _HelpFormatter and flags_markdown


def _field_default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _value_type(annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    """A flag's value type and choices from its field's annotation: ``X | None`` takes X, a ``Literal`` its values."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        if not all(isinstance(choice, str) for choice in choices):
            raise TypeError(f"flag choices must be strings: {choices}")
        return str, choices
    if annotation not in (str, int, float, bool):
        raise TypeError(f"no flag type for {annotation!r}")
    return annotation, None


def _upper_bound_text(metadata: Mapping[str, Any]) -> str:
    """The bounds a reader cannot guess ("> 0" goes without saying for a count)."""
    if "le" not in metadata:
        return ""
    if "ge" in metadata:
        return f" Within {_number(metadata['ge'])}..{_number(metadata['le'])}."
    return f" At most {_number(metadata['le'])}."


def _shown_default(f: Field, value: Any) -> str:
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return _number(value)


def flags_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """docs/flags.md: this server's flags by section, then KServe's own, as ``parser`` has them."""
    parser = parser or build_parser()
    titles = {section.metadata["title"] for section in fields(Settings)}
    lines = [
        "# Flags",
        "",
        "`python -m predictor --help` prints the same. Each flag of this server is a field of one settings section "
        "in `predictor/config.py` (`Limits` in `predictor/request.py`), with its default, its bounds and this text; "
        "a value outside its bounds, or a combination the server refuses, stops the start with exit code 2 and a "
        "message naming the flag.",
        "",
        "This page is generated: edit the fields, then run `python -m predictor.config > docs/flags.md` "
        "(`tests/test_flags.py` fails while the page and the parser differ).",
    ]
    for group in parser._action_groups:
        if group.title in titles:
            lines += ["", f"## {group.title}", "", group.description or "", "", *_markdown_table(group._group_actions)]
    kserve = [action for action in parser._actions if action.option_strings and not hasattr(action, "shown_default")]
    lines += [
        "",
        "## KServe's flags",
        "",
        "KServe's model server parses these (its help text). `--workers` must stay 1: scale with replicas, since each "
        "worker would load its own copy of the model. gRPC and the per-request latency line are off by default here.",
        "",
        *_markdown_table([action for action in kserve if not isinstance(action, argparse._HelpAction)]),
    ]
    return "\n".join(lines) + "\n"


def _markdown_table(actions: list[argparse.Action]) -> list[str]:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in actions:
        shown = getattr(action, "shown_default", None)
        if shown is None:
            shown = "none" if action.default is None else _number(action.default)
        # A literal value reads as code; a description of the default ("$MODEL_DIR or /mnt/models") as text.
        default = f"`{shown}`" if shown == _number(action.default) else shown
        meaning = _markdown_text(action.help or "")
        if action.choices:
            meaning += " One of " + ", ".join(f"`{choice}`" for choice in action.choices) + "."
        rows.append(f"| `{action.option_strings[0]}` | {default} | {meaning} |")
    return rows


def _markdown_text(text: str) -> str:
    """Help text as a table cell: pipes and asterisks escaped, flag names as code."""
    text = text.replace("|", "\\|").replace("*", "\\*")
    return re.sub(r"(?<![\w`-])(--[a-z][a-z0-9_-]*)", r"`\1`", text)


def read_api_keys(path: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The API keys from ``path`` (one per line) and ``$PREDICTOR_API_KEYS`` (lines or commas); none: open server.
    Raises ValueError, without echoing any key, when a given source holds none or cannot be read."""
    keys: list[str] = []
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is no part of a key
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api_key_file {path} cannot be read: {type(exc).__name__}") from None
        from_file = [line.strip() for line in text.splitlines()]
        from_file = [key for key in from_file if key and not key.startswith("#")]
        if not from_file:
            raise ValueError(f"--api_key_file {path} holds no key")
        keys += from_file
    if API_KEYS_ENV in environ:
        from_env = [key.strip() for key in re.split(r"[,\n]", environ[API_KEYS_ENV]) if key.strip()]
        if not from_env:  # set but empty (a Secret with no value): refuse rather than serve without keys
            raise ValueError(f"${API_KEYS_ENV} is set but holds no key")
        keys += from_env
    if any(len(key) < 16 for key in keys):
        raise ValueError("API keys must be at least 16 characters long")
    return tuple(dict.fromkeys(keys))


def parse_settings(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """The flags and the settings made from them; exit code 2 with a message naming the flag when one is refused."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # KServe's flags are not settings fields: their rules are checked here.
    if args.workers != 1:
        parser.error("--workers must be 1: scale with replicas (each worker would load its own copy of the model)")
    try:
        settings = Settings.from_args(args)
        keys = read_api_keys(args.api_key_file)
    except ValueError as exc:
        parser.error(str(exc))
    if keys and args.enable_grpc:
        parser.error("--enable_grpc cannot be used with API keys: gRPC requests would not be checked for one")
    return args, settings


if __name__ == "__main__":
    sys.stdout.write(flags_markdown())
