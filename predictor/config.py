"""Command-line flags (KServe's own plus this server's) and the frozen settings built from them.

Each default is written once, on its dataclass field; the flags read it from there, and every list of names
comes from its ``Literal`` type.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from predictor.request import (
    HARD_MAX_BATCH_INSTANCES,
    HARD_MAX_IMAGE_SIZE,
    HARD_MAX_LORAS,
    HARD_MAX_PROMPT_CHARS,
    HARD_MAX_STEPS,
    MAX_GUIDANCE,
    MAX_T5_TOKENS,
    MIN_IMAGE_SIZE,
    SCHEDULER_NAMES,
    Limits,
)

Device = Literal["auto", "cuda", "cpu"]
Dtype = Literal["auto", "float16", "bfloat16", "float32"]
SafetyChecker = Literal["checkpoint", "on", "off"]
CompileMode = Literal["reduce-overhead", "default", "max-autotune-no-cudagraphs"]
LoraBatching = Literal["mixed", "grouped"]


@dataclass(frozen=True)
class ModelSource:
    """Where the pipeline comes from and how it is placed."""

    model_dir: str = field(default_factory=lambda: os.environ.get("MODEL_DIR", "/mnt/models"))
    model_id: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None
    variant: str = "auto"  # "auto", "none", or a variant name such as "fp16" (*.fp16.safetensors)
    device: Device = "auto"
    dtype: Dtype = "auto"
    safety_checker: SafetyChecker = "checkpoint"
    max_sequence_length: int | None = None  # T5 tokens (FLUX, SD3); None: the family's default, as in diffusers
    preview_vae_dir: str | None = None  # a tiny VAE (diffusers AutoencoderTiny, e.g. TAESD) that decodes previews
    lora_dir: str | None = None  # LoRA adapters requests may name (one .safetensors file each)
    max_lora_bytes: int = 1024**3


@dataclass(frozen=True)
class EngineConfig:
    model_name: str = "model"  # the metrics' label
    max_batch_size: int = 8
    max_queue: int = 32
    request_timeout_s: float | None = 300.0  # None: no deadline
    torch_threads: int = 0  # 0: torch's default
    compile: bool = False
    compile_mode: CompileMode = "reduce-overhead"
    compile_backend: str = "inductor"
    max_loaded_loras: int = 8  # LoRA adapters kept in the model at once (least recently used out first)
    # mixed: rows with different adapter sets share one denoiser call; grouped: one call per set
    lora_batching: LoraBatching = "mixed"


@dataclass(frozen=True)
class ServerConfig:
    warmup_steps: int = 2
    grace_period_s: int = 30
    max_body_bytes: int = 1024 * 1024
    max_image_bytes: int = 32 * 1024 * 1024  # the routes that take input images (base64 adds a third)
    compile_cache_dir: str = field(
        default_factory=lambda: os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor")
    )
    load_timeout_s: float = 1800.0  # liveness fails when loading (compile included) takes longer
    api_key_file: str | None = None  # keys for the generation routes, one per line; or $PREDICTOR_API_KEYS


@dataclass(frozen=True)
class Settings:
    source: ModelSource
    limits: Limits
    engine: EngineConfig
    server: ServerConfig

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            source=_from_namespace(ModelSource, args),
            limits=_from_namespace(Limits, args),
            engine=_from_namespace(EngineConfig, args),
            server=_from_namespace(ServerConfig, args),
        )


def _from_namespace(cls: type, args: argparse.Namespace) -> Any:
    """An instance of dataclass ``cls`` from the flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``: the one place it is written."""
    for f in fields(cls):
        if f.name == name:
            if f.default_factory is not MISSING:
                return f.default_factory()
            return f.default
    raise KeyError(name)


def _positive(kind: type = int):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Importing kserve.model_server parses sys.argv for KServe's flags; that is its design.
    from kserve import model_server

    parser = argparse.ArgumentParser(
        prog="python -m predictor",
        description="Serve a diffusers text-to-image pipeline (SD 1.x, SD 2.x, SDXL) with KServe: v1, v2, "
        "POST /generate and the OpenAI Images API.",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # gRPC serves no image route here; turn it on explicitly if wanted. The per-request latency line is
    # opt-in: uvicorn's access log already says what happened, and /metrics has the timings.
    parser.set_defaults(enable_grpc=False, enable_latency_logging=False)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_dir",
        default=default(ModelSource, "model_dir"),
        help="Directory with a diffusers pipeline (model_index.json); used first when it holds one. "
        "KServe's storage initializer puts storageUri weights here. Default: $MODEL_DIR or /mnt/models.",
    )
    model.add_argument(
        "--model_id",
        default=default(ModelSource, "model_id"),
        help="Hugging Face repo id used when --model_dir holds no pipeline, or a builtin with random weights, made "
        "offline: builtin:tiny, builtin:tiny-sd2, builtin:tiny-inpaint, builtin:tiny-sdxl, builtin:tiny-sdxl-inpaint, "
        "builtin:tiny-flux, builtin:tiny-flux-dev, "
        "builtin:tiny-sd3 (tests); builtin:sd-v1-arch, builtin:sd2-arch, builtin:sdxl-arch, builtin:flux-arch, "
        "builtin:flux-schnell-arch, builtin:sd35-arch, builtin:sd35-medium-arch (full-size, for GPU benchmarks).",
    )
    model.add_argument("--revision", default=default(ModelSource, "revision"), help="Git revision of --model_id.")
    model.add_argument(
        "--variant",
        default=default(ModelSource, "variant"),
        help="Weight files to load: auto loads the fp16 variant (*.fp16.safetensors, half the bytes of the plain "
        "float32 files) when the dtype is float16 and every component has it, else the plain files; none: always "
        "the plain files; any other name (fp16, bf16, ...): that variant.",
    )
    model.add_argument(
        "--device", choices=get_args(Device), default=default(ModelSource, "device"), help="auto: CUDA when present."
    )
    model.add_argument(
        "--dtype",
        choices=get_args(Dtype),
        default=default(ModelSource, "dtype"),
        help="auto: float16 on CUDA (bfloat16 for FLUX and SD3, which overflow in float16), float32 on CPU.",
    )
    model.add_argument(
        "--safety_checker",
        choices=get_args(SafetyChecker),
        default=default(ModelSource, "safety_checker"),
        help="checkpoint: run the safety checker when the checkpoint ships one; on: require it; off: never run it. "
        "Flagged images are answered black with nsfw: true.",
    )
    model.add_argument(
        "--max_sequence_length",
        type=_positive(),
        default=default(ModelSource, "max_sequence_length"),
        help="FLUX and SD3: the T5 encoder's prompt window in tokens, at most 512 (default: 512 for FLUX, 256 for "
        "SD3, as diffusers sets them). Longer prompts are cut and answered prompt_truncated: true.",
    )
    model.add_argument(
        "--preview_vae_dir",
        default=default(ModelSource, "preview_vae_dir"),
        help="A directory holding a tiny VAE saved by diffusers (AutoencoderTiny: madebyollin/taesd for SD 1.x and "
        "2.x, taesdxl for SDXL, taef1 for FLUX, taesd3 for SD3) that decodes partial images at full size. Without "
        "it, previews come from a linear latent-to-RGB map fitted to the model's own VAE (no extra weights, 1/8 "
        "the resolution, scaled up).",
    )

    loras = parser.add_argument_group("LoRA adapters")
    loras.add_argument(
        "--lora_dir",
        default=default(ModelSource, "lora_dir"),
        help="A directory of LoRA adapters (.safetensors, in any format diffusers' load_lora_weights reads: "
        "diffusers/PEFT, kohya) that requests name in 'loras' by file name without the suffix. Read at start; files "
        "that cannot be used are listed with the reason (GET /v1/models/NAME/loras).",
    )
    loras.add_argument(
        "--max_lora_bytes",
        type=_positive(),
        default=default(ModelSource, "max_lora_bytes"),
        help="Largest adapter file served; larger ones are refused at start.",
    )
    loras.add_argument(
        "--max_loras_per_request",
        type=_positive(),
        default=default(Limits, "max_loras_per_request"),
        help="Most adapters one request may name.",
    )
    loras.add_argument(
        "--max_loaded_loras",
        type=_positive(),
        default=default(EngineConfig, "max_loaded_loras"),
        help="Adapters kept in the model at once; past it the least recently used one no running image needs is "
        "taken out (a file is read again when next named). With --compile, the number of fixed slots each changed "
        "layer holds (an image whose adapters find no free slot waits for one).",
    )
    loras.add_argument(
        "--lora_batching",
        choices=get_args(LoraBatching),
        default=default(EngineConfig, "lora_batching"),
        help="mixed: images with different adapters (and none) share every denoiser call, each row with its own "
        "adapters; grouped: images share a call only with the same adapters and scales.",
    )

    limits = parser.add_argument_group("request limits")
    limits.add_argument(
        "--max_prompt_chars",
        type=_positive(),
        default=default(Limits, "max_prompt_chars"),
        help="Longest prompt, in characters.",
    )
    limits.add_argument(
        "--max_steps", type=_positive(), default=default(Limits, "max_steps"), help="Most steps a request may ask."
    )
    limits.add_argument(
        "--default_steps",
        type=_positive(),
        default=default(Limits, "default_steps"),
        help="Steps when a request names none.",
    )
    limits.add_argument(
        "--max_image_size",
        type=_positive(),
        default=default(Limits, "max_image_size"),
        help="Largest width or height.",
    )
    limits.add_argument(
        "--max_input_pixels",
        type=_positive(),
        default=default(Limits, "max_input_pixels"),
        help="Most pixels an input image or mask may have; refused from its header, before it is decoded.",
    )
    limits.add_argument(
        "--max_batch_instances",
        type=_positive(),
        default=default(Limits, "max_batch_instances"),
        help="Most images in one request (v1 instances, v2 N, OpenAI n).",
    )
    limits.add_argument(
        "--default_scheduler",
        choices=("auto", *SCHEDULER_NAMES),
        default=default(Limits, "default_scheduler"),
        help="Scheduler when a request names none; auto: dpmpp_2m for SD 1.x, 2.x and SDXL, the checkpoint's own "
        "for FLUX and SD3 (euler). It is made from the checkpoint's own scheduler config, so settings such as "
        "timestep_spacing (trailing for Turbo checkpoints), prediction_type and the flow-matching shift carry over.",
    )
    limits.add_argument(
        "--default_guidance_scale",
        type=float,
        default=default(Limits, "default_guidance_scale"),
        help="Guidance scale when a request names none (0 for Turbo checkpoints: they are distilled without it); "
        "default: the family's, as diffusers sets it (7.5 SD, 5 SDXL, 3.5 FLUX.1-dev, 0 FLUX.1-schnell, 7 SD3).",
    )

    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max_batch_size",
        type=_positive(),
        default=default(EngineConfig, "max_batch_size"),
        help="Most images in one denoiser call (1: serial).",
    )
    engine.add_argument(
        "--max_queue",
        type=_non_negative_int,
        default=default(EngineConfig, "max_queue"),
        help="Most images waiting; beyond it, 503 overloaded.",
    )
    engine.add_argument(
        "--request_timeout_s",
        type=_positive(float),
        default=default(EngineConfig, "request_timeout_s"),
        help="A request still unfinished after this many seconds gets 504 and its work stops.",
    )
    engine.add_argument(
        "--torch_threads",
        type=_non_negative_int,
        default=default(EngineConfig, "torch_threads"),
        help="CPU threads for torch (0: torch's default).",
    )
    engine.add_argument(
        "--warmup_steps",
        type=_non_negative_int,
        default=default(ServerConfig, "warmup_steps"),
        help="Steps of the warm-up generation run before the model reports ready (0: none).",
    )

    fast = parser.add_argument_group("GPU fast path")
    fast.add_argument(
        "--compile",
        action="store_true",
        default=default(EngineConfig, "compile"),
        help="torch.compile the denoiser and the VAE decoder before the model reports ready (minutes the first "
        "time; keep --compile_cache_dir so restarts reuse the result).",
    )
    fast.add_argument(
        "--compile_mode",
        choices=get_args(CompileMode),
        default=default(EngineConfig, "compile_mode"),
        help="torch.compile mode for the denoiser: reduce-overhead replays CUDA graphs (on CUDA; recorded for "
        "batches of 2, 4, 8, ... rows); default compiles without them.",
    )
    fast.add_argument(
        "--compile_cache_dir",
        default=default(ServerConfig, "compile_cache_dir"),
        help="Persistent compile cache (sets TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR); keep it on a volume "
        "or in the image so a restarted pod skips compiling. Default: $TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor.",
    )
    fast.add_argument(
        "--compile_backend",
        default=default(EngineConfig, "compile_backend"),
        help="torch.compile backend (inductor; eager for testing).",
    )

    server = parser.add_argument_group("server")
    server.add_argument(
        "--max_body_bytes",
        type=_positive(int),
        default=default(ServerConfig, "max_body_bytes"),
        help="Largest request body on routes without input images; larger ones get 413 before they are read whole.",
    )
    server.add_argument(
        "--max_image_bytes",
        type=_positive(int),
        default=default(ServerConfig, "max_image_bytes"),
        help="Largest request body on the routes that take input images (/generate, v1 :predict, v2 /infer, "
        "/v1/images/edits); base64 makes an image a third larger.",
    )
    server.add_argument(
        "--load_timeout_s",
        type=_positive(float),
        default=default(ServerConfig, "load_timeout_s"),
        help="Liveness (/livez) fails when loading, compiling and warming up take longer than this, so a hung "
        "download or compile gets the pod restarted; readiness waits for the load either way.",
    )
    server.add_argument(
        "--api_key_file",
        default=default(ServerConfig, "api_key_file"),
        help=f"File of API keys, one per line (# starts a comment). When set, or when ${API_KEYS_ENV} holds keys "
        "(one per line or comma-separated, e.g. from a Secret), every POST route (v1, v2, /generate, the OpenAI "
        "route) needs 'Authorization: Bearer KEY'; health, readiness, metrics and the playground page stay open.",
    )
    server.add_argument(
        "--grace_period_s",
        type=_positive(int),
        default=default(ServerConfig, "grace_period_s"),
        help="On SIGTERM, how long in-flight requests may take to finish.",
    )
    return parser


API_KEYS_ENV = "PREDICTOR_API_KEYS"


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers != 1:
        parser.error("--workers must be 1: scale with replicas (each worker would load its own copy of the model)")
    if args.max_steps > HARD_MAX_STEPS:
        parser.error(f"--max_steps must be at most {HARD_MAX_STEPS}")
    if args.default_steps > args.max_steps:
        parser.error("--default_steps must not exceed --max_steps")
    if not MIN_IMAGE_SIZE <= args.max_image_size <= HARD_MAX_IMAGE_SIZE:
        parser.error(f"--max_image_size must be within {MIN_IMAGE_SIZE}..{HARD_MAX_IMAGE_SIZE}")
    if args.default_guidance_scale is not None and not 0 <= args.default_guidance_scale <= MAX_GUIDANCE:
        parser.error(f"--default_guidance_scale must be within 0..{MAX_GUIDANCE:g}")
    if args.max_sequence_length is not None and args.max_sequence_length > MAX_T5_TOKENS:
        parser.error(f"--max_sequence_length must be at most {MAX_T5_TOKENS} (the T5 encoders' window)")
    if args.max_prompt_chars > HARD_MAX_PROMPT_CHARS:
        parser.error(f"--max_prompt_chars must be at most {HARD_MAX_PROMPT_CHARS}")
    if args.max_batch_instances > HARD_MAX_BATCH_INSTANCES:
        parser.error(f"--max_batch_instances must be at most {HARD_MAX_BATCH_INSTANCES}")
    try:
        keys = read_api_keys(args.api_key_file)
    except ValueError as exc:
        parser.error(str(exc))
    if keys and args.enable_grpc:
        parser.error("--enable_grpc cannot be used with API keys: gRPC requests would not be checked for one")
    if args.max_loras_per_request > HARD_MAX_LORAS:
        parser.error(f"--max_loras_per_request must be at most {HARD_MAX_LORAS}")
    if args.lora_dir is not None and args.compile and args.max_loras_per_request > args.max_loaded_loras:
        parser.error(
            "with --compile, adapters live in --max_loaded_loras fixed slots: --max_loras_per_request "
            f"({args.max_loras_per_request}) must not exceed it ({args.max_loaded_loras})"
        )
    if args.max_queue < args.max_batch_instances:
        parser.error("--max_queue must be at least --max_batch_instances, or large requests could never queue")
    return args, Settings.from_args(args)
