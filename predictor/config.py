"""Command-line flags (KServe's own plus this server's) and the frozen settings built from them."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from predictor.schemas import HARD_MAX_IMAGE_SIZE, HARD_MAX_PROMPT_CHARS, HARD_MAX_STEPS, SCHEDULER_NAMES, Limits

DEFAULT_MODEL_ID = "CompVis/stable-diffusion-v1-4"


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
        description="Serve a Stable Diffusion pipeline with KServe (v1, v2 and POST /generate).",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # gRPC serves no image route here; turn it on explicitly if wanted.
    parser.set_defaults(enable_grpc=False)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_dir",
        default=os.environ.get("MODEL_DIR", "/mnt/models"),
        help="Directory with a diffusers pipeline (model_index.json); used first when it holds one. "
        "KServe's storage initializer puts storageUri weights here.",
    )
    model.add_argument(
        "--model_id",
        default=DEFAULT_MODEL_ID,
        help="Hugging Face repo id used when --model_dir holds no pipeline, or builtin:tiny / builtin:sd-v1-arch "
        "(random weights, offline).",
    )
    model.add_argument("--revision", default=None, help="Git revision of --model_id on the Hub.")
    model.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when present.")
    model.add_argument(
        "--dtype",
        choices=["auto", "float16", "bfloat16", "float32"],
        default="auto",
        help="auto: float16 on CUDA, float32 on CPU.",
    )

    model.add_argument(
        "--safety_checker",
        choices=["checkpoint", "on", "off"],
        default="checkpoint",
        help="checkpoint: run the safety checker when the checkpoint ships one; on: require it; off: never run it. "
        "Flagged images are answered black with nsfw: true.",
    )

    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max_prompt_chars", type=_positive(), default=2000, help="Longest prompt, in characters.")
    limits.add_argument("--max_steps", type=_positive(), default=150, help="Most denoising steps a request may ask.")
    limits.add_argument("--default_steps", type=_positive(), default=25, help="Steps when a request names none.")
    limits.add_argument("--max_image_size", type=_positive(), default=1024, help="Largest width or height.")
    limits.add_argument(
        "--max_batch_instances", type=_positive(), default=8, help="Most images in one request (v1 instances, v2 N)."
    )
    limits.add_argument(
        "--default_scheduler", choices=SCHEDULER_NAMES, default="dpmpp_2m", help="Scheduler when a request names none."
    )

    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max_batch_size", type=_positive(), default=8, help="Most images in one UNet call (1: serial)."
    )
    engine.add_argument(
        "--max_queue", type=_non_negative_int, default=32, help="Most images waiting; beyond it, 503 overloaded."
    )
    engine.add_argument(
        "--request_timeout_s",
        type=_positive(float),
        default=300.0,
        help="A request still unfinished after this many seconds gets 504 and its work stops.",
    )
    engine.add_argument(
        "--torch_threads", type=_non_negative_int, default=0, help="CPU threads for torch (0: torch's default)."
    )
    engine.add_argument(
        "--warmup_steps",
        type=_non_negative_int,
        default=2,
        help="Steps of the warm-up generation run before the model reports ready (0: none).",
    )
    fast = parser.add_argument_group("GPU fast path")
    fast.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet and the VAE decoder before the model reports ready (minutes the first time; "
        "keep --compile_cache_dir so restarts reuse the result).",
    )
    fast.add_argument(
        "--compile_mode",
        choices=["reduce-overhead", "default", "max-autotune-no-cudagraphs"],
        default="reduce-overhead",
        help="torch.compile mode for the UNet: reduce-overhead replays CUDA graphs (recorded for batch buckets "
        "1, 2, 4, ... images); default compiles without them.",
    )
    fast.add_argument(
        "--compile_cache_dir",
        default=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor"),
        help="Persistent compile cache (sets TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR); keep it on a volume "
        "or in the image so a restarted pod skips compiling.",
    )
    fast.add_argument(
        "--compile_backend", default="inductor", help="torch.compile backend (inductor; eager for testing)."
    )

    server = parser.add_argument_group("server")
    server.add_argument(
        "--max_body_bytes",
        type=_positive(int),
        default=1024 * 1024,
        help="Largest request body; larger ones get 413 before they are read whole.",
    )
    server.add_argument(
        "--grace_period_s",
        type=_positive(int),
        default=30,
        help="On SIGTERM, how long in-flight requests may take to finish.",
    )
    return parser


@dataclass(frozen=True)
class Settings:
    model_name: str
    model_dir: str
    model_id: str
    revision: str | None
    device: str
    dtype: str
    safety_checker: str
    limits: Limits
    max_batch_size: int
    max_queue: int
    request_timeout_s: float
    torch_threads: int
    warmup_steps: int
    grace_period_s: int
    max_body_bytes: int
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    compile_cache_dir: str = "/tmp/torchinductor"
    compile_backend: str = "inductor"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            model_name=args.model_name,
            model_dir=args.model_dir,
            model_id=args.model_id,
            revision=args.revision,
            device=args.device,
            dtype=args.dtype,
            safety_checker=args.safety_checker,
            limits=Limits(
                max_prompt_chars=args.max_prompt_chars,
                max_steps=args.max_steps,
                default_steps=args.default_steps,
                max_image_size=args.max_image_size,
                max_batch_instances=args.max_batch_instances,
                default_scheduler=args.default_scheduler,
            ),
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            request_timeout_s=args.request_timeout_s,
            torch_threads=args.torch_threads,
            warmup_steps=args.warmup_steps,
            grace_period_s=args.grace_period_s,
            max_body_bytes=args.max_body_bytes,
            compile=args.compile,
            compile_mode=args.compile_mode,
            compile_cache_dir=args.compile_cache_dir,
            compile_backend=args.compile_backend,
        )


def parse_settings(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers != 1:
        parser.error("--workers must be 1: scale with replicas (each worker would load its own copy of the model)")
    if args.max_steps > HARD_MAX_STEPS:
        parser.error(f"--max_steps must be at most {HARD_MAX_STEPS}")
    if args.default_steps > args.max_steps:
        parser.error("--default_steps must not exceed --max_steps")
    if args.max_image_size > HARD_MAX_IMAGE_SIZE or args.max_image_size < 64:
        parser.error(f"--max_image_size must be within 64..{HARD_MAX_IMAGE_SIZE}")
    if args.max_prompt_chars > HARD_MAX_PROMPT_CHARS:
        parser.error(f"--max_prompt_chars must be at most {HARD_MAX_PROMPT_CHARS}")
    if args.max_queue < args.max_batch_instances:
        parser.error("--max_queue must be at least --max_batch_instances, or large requests could never queue")
    return args, Settings.from_args(args)
