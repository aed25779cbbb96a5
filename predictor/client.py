"""Command-line client: ``python -m predictor.client "a prompt" -o out.png``.

Streams POST /generate as Server-Sent Events, draws a progress bar on stderr and writes the image.
Exits 1 with the server's message when the server refuses or fails the request, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO, get_origin

import httpx

from predictor.request import OUTPUT_FORMATS, GenerationRequest, value_type

DEFAULT_URL = "http://localhost:8080"
API_KEY_ENV = "PREDICTOR_API_KEY"


# This client's short options for request fields; every other field it sends as given has an option of its name.
_SHORT_OPTIONS = {
    "num_inference_steps": "--steps",
    "negative_prompt": "--negative",
    "prompt_2": "--prompt2",
    "negative_prompt_2": "--negative2",
    "prompt_3": "--prompt3",
    "negative_prompt_3": "--negative3",
    "guidance_scale": "--guidance",
    "true_cfg_scale": "--true_cfg",
}
# Fields the client sets its own way: the prompt (positional), the files (--image, --mask), --lora NAME:SCALE,
# the format (-o's extension or --format) and previews (it draws none).
_OWN_WAY = frozenset({"prompt", "image", "mask", "loras", "output_format", "partial_images"})


def _option_type(annotation: Any) -> Any:
    """What a field's option reads: its value's type (a choice among names: a string, which the server checks)."""
    kind = value_type(annotation)
    return str if get_origin(kind) is Literal else kind


# The request fields that are options, each as (option strings, type, help): from the request's one definition.
REQUEST_OPTIONS = {
    name: (
        (_SHORT_OPTIONS[name], f"--{name}") if name in _SHORT_OPTIONS else (f"--{name}",),
        _option_type(info.annotation),
        info.description,
    )
    for name, info in GenerationRequest.model_fields.items()
    if name not in _OWN_WAY
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m predictor.client", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="What to draw.")
    parser.add_argument("-o", "--output", default="out.png", help="Where to write the image (default: out.png).")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"Server base URL (default: {DEFAULT_URL}).")
    for name, (options, kind, help_text) in REQUEST_OPTIONS.items():
        help_text = (help_text or "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(*options, dest=name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(*options, dest=name, type=kind, help=help_text)
    parser.add_argument(
        "--image",
        action="append",
        help="img2img / inpainting: an input picture file (PNG, JPEG or WebP); on models that edit by reference "
        "images (FLUX.2), give it once per reference.",
    )
    parser.add_argument("--mask", help="Inpainting: a mask file, white = repaint, black = keep (needs --image).")
    parser.add_argument(
        "--lora",
        action="append",
        type=lora_choice,
        metavar="NAME[:SCALE]",
        help="A LoRA adapter of the server's --lora_dir, with its scale (default 1); repeat for several "
        "(see GET /v1/models/NAME/loras).",
    )
    parser.add_argument(
        "--format", choices=OUTPUT_FORMATS, help="Image format (default: from -o's extension, else png)."
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds to wait (default: 600).")
    parser.add_argument(
        "--api_key",
        default=os.environ.get(API_KEY_ENV),
        help=f"API key, for a server started with keys (default: ${API_KEY_ENV}).",
    )
    return parser


def lora_choice(text: str) -> dict:
    """NAME or NAME:SCALE, as the request's 'loras' entries."""
    name, _, scale = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"'{text}': give NAME or NAME:SCALE")
    if not scale:
        return {"name": name}
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': the scale must be a number") from None


# File name extensions and the output format each means.
_EXTENSION_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}


def output_format(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The format -o's extension names, or --format; both given and disagreeing is an error (exit 2)."""
    suffix = Path(args.output).suffix.lower().lstrip(".")
    named = _EXTENSION_FORMATS.get(suffix)
    if args.format and named and args.format != named:
        parser.error(f"--format {args.format} disagrees with -o {args.output}; drop --format or rename the file")
    return args.format or named or "png"


def request_body(args: argparse.Namespace, output_format: str) -> dict:
    body: dict = {"prompt": args.prompt}
    for name in REQUEST_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.lora:
        body["loras"] = args.lora
    body["output_format"] = output_format
    return body


def events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: ") and name is not None:
            yield name, json.loads(line[len("data: ") :])
            name = None


def draw_bar(out: TextIO, step: int, total: int, width: int = 30) -> None:
    filled = width * step // max(total, 1)
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    body = request_body(args, output_format(parser, args))
    err = sys.stderr
    for option in ("image", "mask"):
        paths = getattr(args, option)
        if paths is None:
            continue
        encoded = []
        for path in paths if isinstance(paths, list) else [paths]:
            try:
                encoded.append(base64.b64encode(Path(path).read_bytes()).decode("ascii"))
            except OSError as exc:
                print(f"error: cannot read --{option} {path}: {exc.strerror}", file=err)
                return 2
        body[option] = encoded[0] if len(encoded) == 1 else encoded  # several: an edit's reference images
    headers = {"Accept": "text/event-stream"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    try:
        with httpx.stream(
            "POST", f"{args.url.rstrip('/')}/generate", json=body, headers=headers, timeout=args.timeout
        ) as response:
            if response.status_code != 200:
                response.read()
                try:
                    message = response.json().get("error", response.text)
                except ValueError:
                    message = response.text
                print(f"error: {response.status_code}: {message}", file=err)
                return 1
            for name, data in events(response):
                if name == "queued" and data["position"] > 0:
                    err.write(f"\rqueued, {data['position']} ahead")
                elif name == "progress":
                    draw_bar(err, data["step"], data["total"])
                elif name == "error":
                    print(f"\nerror: {data['error']}", file=err)
                    return 1
                elif name == "image":
                    Path(args.output).write_bytes(base64.b64decode(data["b64"]))
                    note = " (flagged by the safety checker)" if data.get("nsfw") else ""
                    print(
                        f"\nwrote {args.output} ({data['width']}x{data['height']}, seed {data['seed']}){note}", file=err
                    )
                    return 0
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=err)
        return 1
    print("\nerror: the server closed the stream without an image", file=err)
    return 1


if __name__ == "__main__":
    sys.exit(main())
