"""The one definition of a generation request: each field a client may send, and what it resolves to.

``GenerationFields`` declares every field once (type, bounds, default and description). ``GenerationRequest``
(/generate, each v1 instance, the v2 tensors and parameters) and OpenAI's requests (``protocols.openai``)
inherit it, so each route accepts, documents and checks the same fields. A field's metadata says the rest:
``OperatorLimit`` names the ``Limits`` flag that lowers its bound, ``FamilyOnly`` marks a field that only some
families take (``ModelTraits.takes``).

``parse_request`` applies the type and the limits and turns every failure into ``InvalidRequest`` naming the
parameter, without echoing the input back. ``resolve`` fills the defaults (seed, size, steps, scheduler) against
the served model's ``ModelTraits`` and gives the engine a ``GenerationParams`` it can trust.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from predictor.errors import InvalidRequest
from predictor.images import check_mask_size, decode_image, decode_mask, fit

# The schedulers a request may ask for; each family (predictor/families) maps the names it takes to diffusers classes.
# Each family accepts a subset (ModelTraits.schedulers): "heun" is for flow-matching models only, and "euler",
# "dpmpp_2m" and "unipc" are those solvers' flow-matching forms on FLUX and SD3.
SchedulerName = Literal[
    "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "pndm", "lms", "unipc", "lcm", "heun"
]
SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)
OutputFormat = Literal["png", "jpeg", "webp"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)

MAX_SEED = 2**32 - 1
# Absolute ceilings; the operator's flags may only lower what a request can ask for.
HARD_MAX_STEPS = 500  # DDIM and PNDM index past the 1000 training steps at 1000
HARD_MAX_IMAGE_SIZE = 4096
HARD_MAX_PROMPT_CHARS = 100_000
HARD_MAX_BATCH_INSTANCES = 128
MIN_IMAGE_SIZE = 64
SIZE_MULTIPLE = 8  # every family's; FLUX and SD3 need 16 (ModelTraits.size_multiple)
MAX_GUIDANCE = 30.0
MAX_T5_TOKENS = 512  # FLUX's and SD3's T5 prompt window at most (diffusers refuses more)
MAX_LORA_SCALE = 4.0  # |scale| of one adapter; far beyond any adapter's useful range
HARD_MAX_LORAS = 16  # adapters in one request at most; --max_loras_per_request lowers it
HARD_MAX_REFERENCES = 10  # reference images of one edit at most (FLUX.2's); --max_reference_images lowers it
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a file stem: no separators, nothing hidden
# Longest parameter name echoed back in an error body.
_MAX_PARAM_CHARS = 64


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and what it gets where it names nothing."""

    # Each field is a flag: predictor/config.py makes it from the field, its help text and its bounds.
    max_prompt_chars: int = field(
        default=2000,
        metadata={"help": "Longest prompt or negative prompt, in characters.", "gt": 0, "le": HARD_MAX_PROMPT_CHARS},
    )
    max_steps: int = field(
        default=150, metadata={"help": "Most denoising steps a request may ask for.", "gt": 0, "le": HARD_MAX_STEPS}
    )
    default_steps: int = field(
        default=25, metadata={"help": "Steps when a request names none; at most --max_steps.", "gt": 0}
    )
    max_image_size: int = field(
        default=1024,
        metadata={"help": "Largest width or height, in pixels.", "ge": MIN_IMAGE_SIZE, "le": HARD_MAX_IMAGE_SIZE},
    )
    max_batch_instances: int = field(
        default=8,
        metadata={
            "help": "Most images in one request (v1 instances, v2 N, OpenAI n).",
            "gt": 0,
            "le": HARD_MAX_BATCH_INSTANCES,
        },
    )
    # auto: the family's (ModelTraits.default_scheduler)
    default_scheduler: Literal["auto", SchedulerName] = field(
        default="auto",
        metadata={
            "help": "Scheduler when a request names none; auto: the family's. It is made from the checkpoint's own "
            "scheduler config, so settings such as timestep_spacing (trailing for Turbo checkpoints), "
            "prediction_type and the flow-matching shift carry over; one the model cannot use stops the start."
        },
    )
    # None: the family's (ModelTraits.default_guidance_scale)
    default_guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "Guidance scale when a request names none (the family's by default, as diffusers sets it; "
            "GET /v1/models/NAME/schedulers reports the one in use). 0 for Turbo checkpoints: they are distilled "
            "without guidance.",
            "ge": 0.0,
            "le": MAX_GUIDANCE,
            "default_text": "the family's",
        },
    )
    max_input_pixels: int = field(
        default=4096 * 4096,
        metadata={
            "help": "Most pixels an input image or mask may have; refused from its header, before it is decoded.",
            "gt": 0,
        },
    )
    max_loras_per_request: int = field(
        default=4, metadata={"help": "Most LoRA adapters one request may name.", "gt": 0, "le": HARD_MAX_LORAS}
    )
    max_reference_images: int = field(
        default=4,
        metadata={
            "help": "Most reference images one edit may give, on models that edit by reference (FLUX.2); "
            f"each adds its tokens to every step. At most {HARD_MAX_REFERENCES}.",
            "gt": 0,
            "le": HARD_MAX_REFERENCES,
        },
    )

    def for_model(self, traits: ModelTraits) -> Limits:
        """These limits with the family's defaults in place of "auto", once the model is known, and the model's
        own scheduler names (for the message that refuses another)."""
        scheduler = traits.default_scheduler if self.default_scheduler == "auto" else self.default_scheduler
        guidance = self.default_guidance_scale
        limits = replace(
            self,
            default_scheduler=scheduler,
            default_guidance_scale=traits.default_guidance_scale if guidance is None else guidance,
            max_reference_images=min(self.max_reference_images, traits.max_reference_images),
        )
        return ModelLimits(**vars(limits), schedulers=traits.schedulers)

    @property
    def scheduler_names(self) -> tuple[str, ...]:
        """The scheduler names a request may give: every one until the model is known."""
        return SCHEDULER_NAMES

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_prompt_chars": self.max_prompt_chars,
            "max_steps": self.max_steps,
            "default_steps": self.default_steps,
            "min_image_size": MIN_IMAGE_SIZE,
            "max_image_size": self.max_image_size,
            "image_size_multiple": SIZE_MULTIPLE,
            "max_guidance_scale": MAX_GUIDANCE,
            "max_seed": MAX_SEED,
            "max_batch_instances": self.max_batch_instances,
            "max_input_pixels": self.max_input_pixels,
            "max_loras_per_request": self.max_loras_per_request,
            "max_lora_scale": MAX_LORA_SCALE,
            "max_reference_images": self.max_reference_images,
            "default_scheduler": self.default_scheduler,
            "default_guidance_scale": self.default_guidance_scale,
            "schedulers": list(SCHEDULER_NAMES),  # replaced by the model's own once it is loaded
            "output_formats": list(OUTPUT_FORMATS),
        }


@dataclass(frozen=True)
class ModelTraits:
    """What the served model accepts, beyond the shared request fields: set by the loaded family."""

    family: str  # "sd" (1.x and 2.x), "sdxl", "flux", "sd3"
    native_size: int
    second_text_encoder: bool = False  # prompt_2 / negative_prompt_2 reach a second encoder (SDXL, FLUX's T5, SD3)
    lcm_max_steps: int = 50  # scheduler "lcm" takes at most the checkpoint's original_inference_steps
    schedulers: tuple[str, ...] = tuple(n for n in SCHEDULER_NAMES if n != "heun")
    default_scheduler: str = "dpmpp_2m"
    default_guidance_scale: float = 7.5
    default_true_cfg_scale: float = 1.0  # true CFG (FLUX, Qwen-Image) with a negative prompt, above 1
    size_multiple: int = SIZE_MULTIPLE
    fields: frozenset[str] = frozenset()  # which of FAMILY_FIELDS this model takes
    # "cfg": classifier-free guidance rows; "embedded": the scale is an input of the denoiser (FLUX.1-dev);
    # "none": the model takes no guidance scale (FLUX.1-schnell).
    guidance: Literal["cfg", "embedded", "none"] = "cfg"
    max_prompt_tokens: dict[str, int] = field(default_factory=lambda: {"prompt": 77})  # per text field
    max_image_size: int | None = None  # the model's own ceiling (SD3's position embedding), None: none
    # Which of "text", "img2img", "inpaint", "edit" the model takes: an inpainting checkpoint (a UNet with mask and
    # masked-image channels) takes "inpaint" only; "edit": the input images are references (FLUX.2).
    modes: frozenset[str] = frozenset({"text"})
    # "edit": what the pipeline refuses of a reference (a side under min_side, a longer side over max_aspect times
    # the other), and the area it scales one down to (the output's default size is the first one's, so scaled).
    reference_min_side: int = 64
    reference_max_aspect: float = 8.0
    reference_max_area: int = 1024 * 1024
    # The output's default size: "first-within-area", the first reference's scaled down to reference_max_area when
    # larger (FLUX.2); "last-at-area", the last one's aspect ratio at that area, sides rounded to 32 (Qwen-Image-Edit)
    reference_output_size: Literal["first-within-area", "last-at-area"] = "first-within-area"
    max_reference_images: int = HARD_MAX_REFERENCES  # the pipeline's own maximum (Qwen-Image-Edit-Plus: 3)
    # img2img and inpainting defaults as diffusers' pipelines for the family set them (SD 0.8 and 1, FLUX and SD3 0.6)
    default_strength: dict[str, float] = field(default_factory=lambda: {"img2img": 0.8, "inpaint": 1.0})
    image_schedulers: tuple[str, ...] = ()  # those that can start from an image (FLUX and SD3: scale_noise)
    # img2img strength rounding: SD's keeps int(steps * strength) steps, the flow-matching pipelines start at
    # int(steps - steps * strength) (kept_steps)
    strength_rounded_from_start: bool = False

    def takes(self, name: str) -> bool:
        return name in self.fields or (name in ("prompt_2", "negative_prompt_2") and self.second_text_encoder)


# ---- field types and metadata ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorLimit:
    """Field metadata: an operator's flag lowers this field's bound to the ``Limits`` attribute named here (the
    type keeps the hard ceiling). Errors and the OpenAPI documents state the operator's bound."""

    attribute: str


@dataclass(frozen=True)
class FamilyOnly:
    """Field metadata: only the families ``takers`` names take this field (``ModelTraits.takes``)."""

    takers: str


Prompt = Annotated[str, Field(min_length=1, max_length=HARD_MAX_PROMPT_CHARS), OperatorLimit("max_prompt_chars")]
OptionalText = Annotated[
    Annotated[str, Field(max_length=HARD_MAX_PROMPT_CHARS)] | None, OperatorLimit("max_prompt_chars")
]
Steps = Annotated[int, Field(ge=1, le=HARD_MAX_STEPS)]
ImageSize = Annotated[int, Field(ge=MIN_IMAGE_SIZE, le=HARD_MAX_IMAGE_SIZE, multiple_of=SIZE_MULTIPLE)]
OptionalImageSize = Annotated[ImageSize | None, OperatorLimit("max_image_size")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Guidance = Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)]
InputImage = Annotated[str, Field(min_length=1)]  # base64 (or a data: URL); the body limit bounds its size
Strength = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
PartialImages = Annotated[int, Field(ge=0, le=3)]  # OpenAI's bound for partial_images
_SECOND_ENCODER = FamilyOnly("models with a second text encoder (SDXL, FLUX, SD3)")
_THIRD_ENCODER = FamilyOnly("models with a third text encoder (SD3 with its T5 encoder)")


class LoraChoice(BaseModel):
    """One LoRA adapter of --lora_dir for this request, and how strongly it applies."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=LORA_NAME_PATTERN)] = Field(
        description="The adapter's file name without .safetensors (GET /v1/models/{name}/loras lists them)."
    )
    scale: Annotated[float, Field(ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)] = Field(
        default=1.0, description="The adapter's weight, as diffusers' set_adapters takes it (default 1)."
    )


LoraChoices = Annotated[list[LoraChoice], Field(max_length=HARD_MAX_LORAS)] | None


def _loras_from_text(value: Any) -> Any:
    """Form fields and v2 parameters carry the list as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
            raise ValueError('must be a list like [{"name": "style", "scale": 0.8}] (JSON)') from None
    return value


# ---- the request ------------------------------------------------------------------------------------------------


class GenerationFields(BaseModel):
    """The fields every generation route takes, each declared here once."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Prompt = Field(
        description="What to draw. Prompts past the text encoder's 77 tokens are truncated.",
        json_schema_extra={"pattern": r"\S"},  # not blank; checked by _prompt_not_blank
    )
    negative_prompt: OptionalText = Field(
        default=None,
        description="What to steer away from. SDXL: absent means zero conditioning (the checkpoint's "
        'force_zeros_for_empty_prompt), an explicit "" is encoded.',
    )
    prompt_2: Annotated[OptionalText, _SECOND_ENCODER] = Field(
        default=None,
        description="SDXL, SD3: the prompt for the second CLIP encoder; FLUX: the prompt for the T5 encoder "
        "(default: prompt).",
    )
    negative_prompt_2: Annotated[OptionalText, _SECOND_ENCODER] = Field(
        default=None,
        description="SDXL, FLUX, SD3: the negative prompt for the second text encoder (default: negative_prompt).",
    )
    prompt_3: Annotated[OptionalText, _THIRD_ENCODER] = Field(
        default=None, description="SD3 only: the prompt for the T5 encoder (default: prompt)."
    )
    negative_prompt_3: Annotated[OptionalText, _THIRD_ENCODER] = Field(
        default=None, description="SD3 only: the negative prompt for the T5 encoder (default: negative_prompt)."
    )
    true_cfg_scale: Annotated[Guidance | None, FamilyOnly("FLUX and Qwen-Image models")] = Field(
        default=None,
        description="FLUX and Qwen-Image only: classifier-free guidance against negative_prompt when above 1 "
        "(default: the pipeline's, FLUX 1: off, Qwen-Image 4; each guided step costs two transformer rows).",
    )
    num_inference_steps: Annotated[Steps | None, OperatorLimit("max_steps")] = Field(
        default=None, description="Denoising steps (default: --default_steps)."
    )
    guidance_scale: Guidance | None = Field(
        default=None, description="Classifier-free guidance; <= 1 disables it (default: --default_guidance_scale)."
    )
    seed: Seed | None = Field(default=None, description="0..2^32-1; drawn by the server when absent, always returned.")
    scheduler: SchedulerName | None = Field(default=None, description="Sampler (default: --default_scheduler).")
    output_format: OutputFormat = Field(default="png", description="Encoding of the returned image.")
    partial_images: PartialImages | None = Field(
        default=None,
        description="Streaming only (/generate with Accept: text/event-stream, stream: true on the OpenAI routes): "
        "this many previews of the picture forming, evenly spaced over the steps, before the image (default 0). "
        "Cheap: a linear map of the latents, not the VAE.",
    )
    loras: LoraChoices = Field(
        default=None,
        description="LoRA adapters of the server's --lora_dir to apply, in order, each with a scale: "
        '[{"name": "style", "scale": 0.8}] (JSON text in a form field or a v2 parameter). '
        "At most --max_loras_per_request.",
    )

    _parse_loras = field_validator("loras", mode="before")(_loras_from_text)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain a non-whitespace character")
        return value


class ImageStrength(BaseModel):
    """The field of the requests that start from an input image (/generate and the like, OpenAI's edits)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    strength: Strength | None = Field(
        default=None,
        description="With an image: how much of the schedule runs, 0 < s <= 1 (default 0.8 for img2img, 1 for "
        "inpainting, as diffusers): the job starts that far from the end and makes that share of the steps.",
    )


class GenerationRequest(ImageStrength, GenerationFields):
    """One image request, as /generate, each v1 instance and the v2 tensors and parameters carry it."""

    width: OptionalImageSize = Field(
        default=None, description="Multiple of 8 (16 for FLUX and SD3); default: the model's native size."
    )
    height: OptionalImageSize = Field(
        default=None, description="Multiple of 8 (16 for FLUX and SD3); default: the model's native size."
    )
    image: InputImage | Annotated[list[InputImage], Field(min_length=1, max_length=HARD_MAX_REFERENCES)] | None = Field(
        default=None,
        description="img2img and inpainting: a PNG, JPEG or WebP image, base64. The output takes its size (rounded "
        "down to the model's size multiple) unless width or height are given, which resize it. On models that edit "
        "by reference (FLUX.2): one image or a list of up to --max_reference_images, the edit's references "
        "(the output takes the first one's size).",
    )
    mask: InputImage | None = Field(
        default=None, description="Inpainting: white repaints, black keeps (binarised at half intensity); base64."
    )
    paste_back: bool = Field(
        default=False,
        description="Inpainting: paste the input back over the kept (black) area of the result, as diffusers' "
        "apply_overlay does; by default the result is the pipeline's own output everywhere.",
    )


def value_type(annotation: Any) -> Any:
    """A field's type without Optional and Annotated: ``str`` for ``Annotated[str, ...] | None``."""
    if get_origin(annotation) is Annotated:
        return value_type(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
        return value_type(kinds[0]) if len(kinds) == 1 else annotation
    return annotation


def _marked(model: type[BaseModel], kind: type[Any]) -> Iterator[tuple[str, Any]]:
    """(field name, metadata) for each of ``model``'s fields that carries metadata of type ``kind``."""
    for name, info in model.model_fields.items():
        for item in info.metadata:
            if isinstance(item, kind):
                yield name, item


# Request fields only some families take, each with the words naming the families that take it.
_FAMILY_TAKERS: dict[str, str] = {name: marker.takers for name, marker in _marked(GenerationFields, FamilyOnly)}
FAMILY_FIELDS: tuple[str, ...] = tuple(_FAMILY_TAKERS)


@dataclass(frozen=True)
class GenerationParams:
    """A validated request with every default resolved: what the engine runs."""

    prompt: str
    negative_prompt: str | None  # None: absent (SDXL zeroes it; SD encodes "")
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    scheduler: str
    output_format: str
    prompt_2: str | None = None  # SDXL's and SD3's second encoder, FLUX's T5; None: the first prompt
    negative_prompt_2: str | None = None
    prompt_3: str | None = None  # SD3's T5
    negative_prompt_3: str | None = None
    true_cfg_scale: float = 1.0  # FLUX: classifier-free guidance against the negative prompt when above 1
    # img2img / inpainting: the decoded input (RGB) and mask (grey, white = repaint), already at width x height
    # or to be resized to it; not compared or hashed (params are keys in tests and benchmarks).
    image: Any = field(default=None, compare=False, repr=False)
    mask: Any = field(default=None, compare=False, repr=False)
    # "edit": the decoded reference images (RGB), as given; the family prepares them as its pipeline does.
    references: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    strength: float = 1.0
    partial_images: int = 0  # previews to stream while it runs
    paste_back: bool = False  # inpainting: the input pasted back over the kept area of the result
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale), in the order given

    @property
    def mode(self) -> str:
        """ "text" (text-to-image), "img2img", "inpaint" or "edit" (by reference images)."""
        if self.references:
            return "edit"
        if self.image is None:
            return "text"
        return "img2img" if self.mask is None else "inpaint"

    @property
    def uses_guidance(self) -> bool:
        # diffusers' rule: classifier-free guidance only when the scale exceeds 1.
        return self.guidance_scale > 1.0


def images_of(params: GenerationParams, count: int) -> list[GenerationParams]:
    """The ``count`` images of one request (OpenAI's ``n``): seeds seed, seed+1, ... so each can be reproduced
    alone."""
    return [replace(params, seed=(params.seed + k) % (MAX_SEED + 1)) for k in range(count)]


# ---- validation -------------------------------------------------------------------------------------------------


def _param_name(loc: tuple[Any, ...], prefix: str) -> str:
    # Leave out pydantic's union members ('image' is a string or a list: "constrained-str", "list[...]").
    name = ".".join(str(part) for part in loc if not (isinstance(part, str) and ("-" in part or "[" in part)))
    if len(name) > _MAX_PARAM_CHARS:
        name = name[:_MAX_PARAM_CHARS] + "..."
    return f"{prefix}{name}" if name else prefix.rstrip(".") or "body"


@functools.cache
def _operator_limit_attributes(model: type[BaseModel]) -> dict[str, str]:
    return {name: marker.attribute for name, marker in _marked(model, OperatorLimit)}


def operator_limits(model: type[BaseModel], limits: Limits | None) -> dict[str, int]:
    """``model``'s fields whose bound the operator sets by flag, with that bound (it replaces the type's ceiling)."""
    if limits is None:
        return {}
    return {name: getattr(limits, attribute) for name, attribute in _operator_limit_attributes(model).items()}


def _bound(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# What a form's text could not be read as (pydantic's string parsing), in this server's words.
_PARSING_MESSAGES = {
    "int_parsing": "must be an integer",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
}


def _worded(error: Mapping[str, Any], limit: int | None) -> str:
    """One pydantic error as this server words its own checks, with the operator's ``limit`` where one applies."""
    kind, context, loc = error["type"], error.get("ctx") or {}, error["loc"]
    if kind == "less_than_equal":
        return f"must be at most {_bound(limit if limit is not None else context.get('le'))}"
    if kind == "greater_than_equal":
        return f"must be at least {_bound(context.get('ge'))}"
    if kind == "string_too_long":
        return f"is longer than {limit if limit is not None else context.get('max_length')} characters"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "name":
        return "must be an adapter's name: letters, digits, '.', '_' and '-', starting with a letter or digit"
    if kind == "multiple_of":
        return f"must be a multiple of {_bound(context.get('multiple_of'))}"
    if kind in _PARSING_MESSAGES:
        return _PARSING_MESSAGES[kind]
    if kind == "value_error" and "error" in context:
        return str(context["error"])  # our validator's own words, without pydantic's "Value error," prefix
    return error["msg"]


def invalid_from_validation_error(
    exc: ValidationError,
    prefix: str = "",
    bounds: Mapping[str, int] | None = None,
    schedulers: tuple[str, ...] = SCHEDULER_NAMES,
) -> InvalidRequest:
    """The first pydantic error as an ``InvalidRequest`` worded as this server words its own checks, with the
    operator's bound (``bounds``: field name -> bound) where one applies and the served model's ``schedulers`` for a
    name that is none of them; pydantic's errors never include the input."""
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = tuple(error["loc"])
    param = _param_name(loc, prefix)
    if error["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown field '{param}'", param=param)
    if error["type"] == "literal_error" and loc and loc[-1] == "scheduler":
        return InvalidRequest(f"'{param}' must be one of {', '.join(schedulers)} (this model's)", param=param)
    if error["type"] == "missing":
        return InvalidRequest(f"'{param}' is required", param=param)
    limit = (bounds or {}).get(str(loc[0])) if len(loc) == 1 else None
    return InvalidRequest(f"'{param}' {_worded(error, limit)}", param=param)


@dataclass(frozen=True)
class ModelLimits(Limits):
    """The limits once the model is known (``Limits.for_model``): not flags, so kept apart from ``Limits``."""

    schedulers: tuple[str, ...] = SCHEDULER_NAMES

    @property
    def scheduler_names(self) -> tuple[str, ...]:
        return self.schedulers


Validated = TypeVar("Validated", bound=BaseModel)


def validate(
    model: type[Validated], data: Mapping[str, Any], limits: Limits, prefix: str = "", *, strings: bool = False
) -> Validated:
    """``data`` validated once as ``model``, against its type and the operator's limits. ``strings``: the values
    are form text, read as the type of their field (``"3"`` an integer, ``"true"`` a boolean)."""
    try:
        request = model.model_validate_strings(data) if strings else model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation_error(
            exc, prefix, operator_limits(model, limits), limits.scheduler_names
        ) from None
    check_limits(request, limits, prefix)
    return request


def parse_request(data: Any, limits: Limits, prefix: str = "") -> GenerationRequest:
    """Validate one request body (a JSON object already decoded) against the type and the limits."""
    if not isinstance(data, dict):
        param = prefix.rstrip(".") or "body"
        raise InvalidRequest(f"'{param}' must be a JSON object", param=param)
    return validate(GenerationRequest, data, limits, prefix)


def check_limits(request: BaseModel, limits: Limits, prefix: str = "") -> None:
    """The operator's limits, below the type's hard ceilings; worded as invalid_from_validation_error words them."""
    for name, limit in operator_limits(type(request), limits).items():
        value = getattr(request, name, None)
        if isinstance(value, str) and len(value) > limit:
            raise InvalidRequest(f"'{prefix}{name}' is longer than {limit} characters", param=f"{prefix}{name}")
        if isinstance(value, int) and value > limit:
            raise InvalidRequest(f"'{prefix}{name}' must be at most {limit}", param=f"{prefix}{name}")


_IMAGE_SIDE: TypeAdapter[int] = TypeAdapter(ImageSize)


def checked_image_side(value: int, param: str, limits: Limits) -> int:
    """One side of a size given in another form than ``width`` and ``height`` (OpenAI's ``size``), checked and
    worded as those fields are."""
    try:
        _IMAGE_SIDE.validate_python(value, strict=True)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        raise InvalidRequest(f"'{param}' {_worded(error, limits.max_image_size)}", param=param) from None
    if value > limits.max_image_size:
        raise InvalidRequest(f"'{param}' must be at most {limits.max_image_size}", param=param)
    return value


def json_schema(model: type[BaseModel], limits: Limits) -> dict[str, Any]:
    """A request model's JSON schema with the operator's limits in place of the hard ceilings, self-contained
    (shared definitions inlined, so it can sit anywhere in an OpenAPI document)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    for name, limit in operator_limits(model, limits).items():
        prop = schema["properties"][name]
        for variant in prop.get("anyOf", [prop]):
            for keyword in ("maximum", "maxLength"):
                if keyword in variant:
                    variant[keyword] = limit
    return _inlined(schema, definitions)


def _inlined(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inlined(definitions[ref.removeprefix("#/$defs/")], definitions)
        return {key: _inlined(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inlined(item, definitions) for item in node]
    return node


# ---- resolution against the served model -------------------------------------------------------------------------


def resolve(
    request: GenerationRequest, limits: Limits, traits: ModelTraits, prefix: str = "", adapters: Any = None
) -> GenerationParams:
    """Fill the defaults and check what depends on the served model. ``prefix`` names where the request sits in
    its body; ``adapters`` is the server's LoRA library (``check(loras, param)``), None without --lora_dir."""

    def refuse(name: str, message: str) -> InvalidRequest:
        return InvalidRequest(f"'{prefix}{name}' {message}", param=f"{prefix}{name}")

    loras = _checked_loras(request, limits, adapters, prefix)

    for name, takers in _FAMILY_TAKERS.items():
        if getattr(request, name) is not None and not traits.takes(name):
            raise refuse(name, f"is for {takers}; this model is of the '{traits.family}' family")
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    references: tuple[Any, ...] = ()
    if "edit" in traits.modes and "text" not in traits.modes and request.image is None:
        raise refuse("image", "is required: this checkpoint edits images (an edit-only model); send one or more")
    if "edit" in traits.modes and request.image is not None:
        references = _references(request, limits, traits, prefix)
        image, mask, strength = None, None, 1.0
    else:
        image, mask, strength = _input_images(request, limits, traits, prefix)
    if references:  # the size the pipeline takes from its references, unless asked otherwise
        if traits.reference_output_size == "last-at-area":
            default_width, default_height = at_area(references[-1].size, traits.reference_max_area)
        else:
            default_width, default_height = _scaled_to_area(references[0].size, traits.reference_max_area)
        width = request.width or default_width // traits.size_multiple * traits.size_multiple
        height = request.height or default_height // traits.size_multiple * traits.size_multiple
    elif image is not None:  # the input's size, rounded down to the model's multiple, unless asked otherwise
        width = request.width or image.width // traits.size_multiple * traits.size_multiple
        height = request.height or image.height // traits.size_multiple * traits.size_multiple
        for name, size in (("width", width), ("height", height)):
            if not MIN_IMAGE_SIZE <= size <= limits.max_image_size:
                raise refuse(
                    "image",
                    f"makes a {name} of {size}, outside {MIN_IMAGE_SIZE}..{limits.max_image_size} "
                    f"(--max_image_size); pass width and height to resize it",
                )
        image = fit(image, width, height)
        mask = None if mask is None else fit(mask, width, height)
    else:
        width = request.width or traits.native_size
        height = request.height or traits.native_size
    if max(width, height) > limits.max_image_size:
        taken = f"the size the input images make, {width}x{height}," if references else "the model's native size"
        raise InvalidRequest(
            f"{taken} exceeds --max_image_size {limits.max_image_size}; pass width and height",
            param=f"{prefix}{'width' if width > limits.max_image_size else 'height'}",
        )
    for name, size in (("width", width), ("height", height)):
        if size % traits.size_multiple:
            raise refuse(
                name,
                f"must be a multiple of {traits.size_multiple} for the '{traits.family}' family "
                "(the VAE's 8x times the transformer's 2x2 patches)",
            )
        if traits.max_image_size is not None and size > traits.max_image_size:
            raise refuse(name, f"must be at most {traits.max_image_size}: the model's position embedding ends there")
    steps = request.num_inference_steps or limits.default_steps
    if image is not None and kept_steps(steps, strength, traits.strength_rounded_from_start) < 1:
        raise refuse("strength", f"leaves no step of {steps}: strength x num_inference_steps must be at least 1")
    scheduler = request.scheduler or limits.default_scheduler
    if scheduler == "auto":
        scheduler = traits.default_scheduler
    if scheduler not in traits.schedulers:
        param = "scheduler" if request.scheduler else "scheduler (--default_scheduler)"
        raise InvalidRequest(
            f"'{prefix}{param}' '{scheduler}' is not available for this '{traits.family}' model; "
            f"choose one of {', '.join(traits.schedulers)}",
            param=f"{prefix}scheduler",
        )
    if image is not None and traits.image_schedulers and scheduler not in traits.image_schedulers:
        raise InvalidRequest(
            f"'{prefix}scheduler' '{scheduler}' cannot start from an image on this '{traits.family}' model; "
            f"choose one of {', '.join(traits.image_schedulers)}",
            param=f"{prefix}scheduler",
        )
    if scheduler == "lcm" and steps > traits.lcm_max_steps:
        raise refuse(
            "num_inference_steps",
            f"must be at most {traits.lcm_max_steps} with scheduler 'lcm' (the checkpoint's original_inference_steps)",
        )
    guidance = request.guidance_scale if request.guidance_scale is not None else limits.default_guidance_scale
    if guidance is None:
        guidance = traits.default_guidance_scale
    if traits.guidance == "none":
        distilled = "has no effect on this model: it was distilled without guidance"
        if request.guidance_scale is not None and request.guidance_scale > 1:
            if traits.takes("true_cfg_scale"):
                distilled += "; use true_cfg_scale with a negative_prompt for classifier-free guidance"
            raise refuse("guidance_scale", distilled)
        if request.negative_prompt is not None and not traits.takes("true_cfg_scale"):
            raise refuse("negative_prompt", distilled)
    if traits.guidance == "embedded" and request.negative_prompt is not None and not traits.takes("true_cfg_scale"):
        raise refuse(
            "negative_prompt",
            "has no effect on this model: it is guidance-distilled (guidance_scale is an input of the model), "
            "with no classifier-free guidance against a negative prompt",
        )
    true_cfg = request.true_cfg_scale if request.true_cfg_scale is not None else traits.default_true_cfg_scale
    if traits.takes("true_cfg_scale"):
        negatives = [n for n in ("negative_prompt", "negative_prompt_2") if getattr(request, n) is not None]
        if request.true_cfg_scale is not None and true_cfg > 1 and request.negative_prompt is None:
            raise refuse("true_cfg_scale", "needs a negative_prompt (the model guides against it)")
        if negatives and true_cfg <= 1:
            raise refuse(negatives[0], "takes effect on this model only with true_cfg_scale above 1")
    resolved = {
        "num_inference_steps": steps,
        "guidance_scale": float(guidance),
        "width": width,
        "height": height,
        "seed": seed,
        "scheduler": scheduler,
        "true_cfg_scale": float(true_cfg),
        "image": image,
        "mask": mask,
        "references": references,
        "strength": strength,
        "partial_images": request.partial_images or 0,
        "loras": loras,
    }
    # Every other parameter is the request's field of the same name, as sent.
    given = {f.name: getattr(request, f.name) for f in fields(GenerationParams) if f.name not in resolved}
    return GenerationParams(**given, **resolved)


def _checked_loras(request: GenerationRequest, limits: Limits, adapters: Any, prefix: str) -> tuple:
    """The request's adapters as (name, scale) pairs, each one in the library and usable, at most the limit."""
    param = f"{prefix}loras"
    if not request.loras:
        return ()
    if adapters is None:
        raise InvalidRequest(f"'{param}': this server serves no LoRA adapters (no --lora_dir)", param=param)
    if len(request.loras) > limits.max_loras_per_request:
        raise InvalidRequest(
            f"'{param}' holds {len(request.loras)} adapters; at most {limits.max_loras_per_request} "
            "(--max_loras_per_request)",
            param=param,
        )
    names = [choice.name for choice in request.loras]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise InvalidRequest(f"'{param}' names '{repeated}' twice; give it once, with one scale", param=param)
    loras = tuple((choice.name, float(choice.scale)) for choice in request.loras)
    adapters.check(loras, param)
    return loras


def kept_steps(steps: int, strength: float, start_rounded: bool = False) -> int:
    """The steps an image job runs, as diffusers' ``get_timesteps`` counts them: SD's keeps ``int(steps *
    strength)``; the flow-matching pipelines' (``start_rounded``) start at ``int(steps - steps * strength)``."""
    if start_rounded:
        return steps - int(max(steps - min(steps * strength, steps), 0))
    return min(int(steps * strength), steps)


def at_area(size: tuple[int, int], area: int) -> tuple[int, int]:
    """A size of ``size``'s aspect ratio and about ``area`` pixels, sides rounded to 32 (the Qwen-Image-Edit
    pipelines' ``calculate_dimensions``: for the output, the VAE's inputs and the encoder's)."""
    ratio = size[0] / size[1]
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def _scaled_to_area(size: tuple[int, int], area: int) -> tuple[int, int]:
    """A reference's size once scaled down to ``area`` pixels when larger (diffusers' FLUX.2 image processor)."""
    width, height = size
    if width * height <= area:
        return width, height
    scale = math.sqrt(area / (width * height))
    return int(width * scale), int(height * scale)


def _references(request: GenerationRequest, limits: Limits, traits: ModelTraits, prefix: str) -> tuple[Any, ...]:
    """The request's reference images, decoded and checked as the model's pipeline checks them."""
    for name, what in (("mask", "no mask"), ("strength", "no strength (the references condition every step)")):
        if getattr(request, name) is not None:
            raise InvalidRequest(
                f"'{prefix}{name}': this model edits by reference images: it takes {what}", param=f"{prefix}{name}"
            )
    given = request.image if isinstance(request.image, list) else [request.image]
    if len(given) > limits.max_reference_images:
        raise InvalidRequest(
            f"'{prefix}image' has {len(given)} reference images; at most {limits.max_reference_images} "
            + (
                "(the model's own maximum)"
                if limits.max_reference_images == traits.max_reference_images
                else "(--max_reference_images)"
            ),
            param=f"{prefix}image",
        )
    references = []
    for index, data in enumerate(given):
        param = f"{prefix}image" if len(given) == 1 else f"{prefix}image[{index}]"
        image = decode_image(data, param, limits.max_input_pixels)
        width, height = image.size
        if min(width, height) < traits.reference_min_side:
            raise InvalidRequest(
                f"'{param}' is {width}x{height}: a reference image needs at least {traits.reference_min_side} pixels "
                "a side",
                param=param,
            )
        if max(width, height) > traits.reference_max_aspect * min(width, height):
            raise InvalidRequest(
                f"'{param}' is {width}x{height}: a reference image's sides may differ at most "
                f"{traits.reference_max_aspect:g} times",
                param=param,
            )
        references.append(image)
    return tuple(references)


def _input_images(
    request: GenerationRequest, limits: Limits, traits: ModelTraits, prefix: str
) -> tuple[Any, Any, float]:
    """The request's decoded image and mask and its strength, checked against what the model takes."""
    if isinstance(request.image, list):
        raise InvalidRequest(
            f"'{prefix}image' takes one image on this '{traits.family}' model (img2img, inpainting); lists of "
            "reference images are for models that edit by reference",
            param=f"{prefix}image",
        )
    mode = "text" if request.image is None else "img2img" if request.mask is None else "inpaint"
    if request.image is None:
        for name in ("mask", "strength"):
            if getattr(request, name) is not None:
                raise InvalidRequest(f"'{prefix}{name}' needs an image", param=f"{prefix}{name}")
    if request.paste_back and request.mask is None:
        raise InvalidRequest(f"'{prefix}paste_back' needs an image and a mask", param=f"{prefix}paste_back")
    if mode not in traits.modes:
        param = f"{prefix}{'prompt' if mode == 'text' else 'image' if mode == 'img2img' else 'mask'}"
        if mode == "text" or (mode == "img2img" and "inpaint" in traits.modes):
            message = "this is an inpainting checkpoint: send an image and a mask"
        else:
            message = f"{mode} is not available for this '{traits.family}' model"
        raise InvalidRequest(f"'{param}': {message}", param=param)
    if request.image is None:
        return None, None, 1.0
    image = decode_image(request.image, f"{prefix}image", limits.max_input_pixels)
    mask = None
    if request.mask is not None:
        mask = decode_mask(request.mask, f"{prefix}mask", limits.max_input_pixels)
        check_mask_size(image, mask, f"{prefix}mask")
    strength = request.strength if request.strength is not None else traits.default_strength[mode]
    return image, mask, float(strength)
