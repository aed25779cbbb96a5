"""Image inputs: img2img and inpainting (a 4-channel UNet that blends, and an inpainting checkpoint whose UNet
reads the mask) as jobs in the same batches as text-to-image, each image equal to diffusers' own img2img or
inpainting pipeline's; the share of the schedule a strength runs; the output size rule; bad images refused with
a 400 that says why; and every protocol on a real server, the OpenAI SDK's ``images.edit`` included."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImagePipeline,
)
from PIL import Image

from predictor.builtin import (
    build_tiny_flux_dev,
    build_tiny_inpaint,
    build_tiny_qwenimage,
    build_tiny_sd3,
    build_tiny_sdxl,
    build_tiny_sdxl_inpaint,
    build_tiny_zimage,
)
from predictor.errors import InvalidRequest
from predictor.families.sd import UNET_SCHEDULERS as SCHEDULERS
from predictor.loading import load_pipeline
from predictor.request import GenerationRequest, Limits, resolve
from predictor.testing import (
    TOLERANCE,
    StepLog,
    assert_alone_and_mixed_equal,
    decode_image,
    diffusers_image,
    diffusers_image_job,
    diffusers_pipeline,
    free_port,
    pixels,
    running_engine,
    start_server,
    stop_server,
    wait_ready,
)

SCHEDULER_NAMES = [name for name in SCHEDULERS if name != "lcm"]


def _png(image: Image.Image, fmt: str = "PNG", **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode()


def _picture(width: int = 80, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(width: int = 80, height: int = 64) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-inpaint")
    build_tiny_inpaint().save_pretrained(directory, safe_serialization=True)
    return directory


def _resolved(loaded, **body):
    traits = loaded.traits
    return resolve(GenerationRequest(**body), Limits().for_model(traits), traits)


def _reference(directory: Path, cls):
    return diffusers_pipeline(directory, cls, safety_checker=None)


def _expected(references: dict, p) -> np.ndarray:
    """diffusers' own text-to-image, img2img or inpainting pipeline for ``p``."""
    if p.image is None:
        return diffusers_image(references["text"], p)
    return diffusers_image_job(references["inpaint" if p.mask is not None else "img2img"], p)


def _mixed(loaded, references: dict, cases: list) -> None:
    """Each image equals diffusers' own pipeline's for its mode, alone and with jobs joining mid-flight."""
    expected = [_expected(references, case) for case in cases]
    assert_alone_and_mixed_equal(loaded, cases, expected, join_at_step=1, tolerance=TOLERANCE)


def test_img2img_and_inpainting_equal_diffusers_beside_text_jobs(tiny_model_dir: Path) -> None:
    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    assert loaded.traits.modes == {"text", "img2img", "inpaint"}
    references = {
        "text": _reference(tiny_model_dir, StableDiffusionPipeline),
        "img2img": _reference(tiny_model_dir, StableDiffusionImg2ImgPipeline),
        "inpaint": _reference(tiny_model_dir, StableDiffusionInpaintPipeline),
    }
    image, mask = _png(_picture()), _png(_mask())
    cases = []
    for i, scheduler in enumerate(SCHEDULER_NAMES):
        body = {"prompt": f"a boat {i}", "seed": i, "num_inference_steps": 5, "scheduler": scheduler, "image": image}
        body["guidance_scale"] = [1.0, 6.0][i % 2]
        if i % 2:
            body["mask"] = mask
        if i % 3 == 1:
            body["strength"] = 0.6
        if i == 3:
            body["negative_prompt"] = "fog"
        cases.append(_resolved(loaded, **body))
        # Text jobs at the pictures' size share their UNet calls; the 64x64 ones form a group of their own.
        size = {"width": 80} if i % 2 else {}
        cases.append(
            _resolved(loaded, prompt=f"text {i}", seed=50 + i, num_inference_steps=4, scheduler=scheduler, **size)
        )
    assert {case.mode for case in cases} == {"text", "img2img", "inpaint"}
    assert {case.strength for case in cases if case.mode != "text"} == {0.6, 0.8, 1.0}
    _mixed(loaded, references, cases)


@pytest.mark.parametrize(
    ("build", "cls", "family", "strength"),
    [
        (build_tiny_inpaint, StableDiffusionInpaintPipeline, "sd", 1.0),
        (build_tiny_sdxl_inpaint, StableDiffusionXLInpaintPipeline, "sdxl", 0.9999),
    ],
)
def test_inpainting_checkpoint_equals_diffusers_and_takes_only_inpainting(
    build, cls, family: str, strength: float, tmp_path: Path
) -> None:
    """An inpainting checkpoint (a 9-channel UNet: SD's and SDXL's own pipeline classes) inpaints only, equal to
    diffusers' pipeline at its default strength and a partial one, guided and not, in one batch."""
    build().save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path), "not/used", None, "cpu", "float32")
    traits = loaded.traits
    assert (traits.family, traits.modes, traits.default_strength["inpaint"]) == (family, {"inpaint"}, strength)
    assert traits.default_guidance_scale == 7.5  # both inpainting pipelines' default
    references = {"inpaint": _reference(tmp_path, cls)}
    image, mask = _png(_picture(96, 64, seed=1)), _png(_mask(96, 64))
    cases = [
        _resolved(loaded, prompt=f"p{i}", seed=i, num_inference_steps=4, scheduler=name, image=image, mask=mask)
        for i, name in enumerate(SCHEDULER_NAMES[:3])
    ]
    cases.append(_resolved(loaded, prompt="half", seed=9, strength=0.5, image=image, mask=mask, scheduler="euler"))
    cases.append(_resolved(loaded, prompt="plain", seed=4, guidance_scale=1.0, image=image, mask=mask))
    _mixed(loaded, references, cases)
    for body, param in (({"prompt": "a"}, "prompt"), ({"prompt": "a", "image": image}, "image")):
        with pytest.raises(InvalidRequest, match="inpainting checkpoint") as error:
            _resolved(loaded, **body)
        assert error.value.param == param


def test_paste_back_keeps_the_input_outside_the_mask(tiny_model_dir: Path) -> None:
    """By default the kept area is the pipeline's output; paste_back puts the input back there (diffusers'
    apply_overlay), and is refused without a mask."""
    from predictor.model import _encode_all

    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    picture, white = _picture(96, 64), _mask(96, 64)
    body = {"prompt": "a", "seed": 2, "num_inference_steps": 3, "image": _png(picture), "mask": _png(white)}
    plain, pasted = _resolved(loaded, **body), _resolved(loaded, **body, paste_back=True)
    with running_engine(loaded) as engine:
        results = [engine.generate(plain), engine.generate(pasted)]
    outputs = [decode_image(item.data) for item in _encode_all(results)]
    kept = np.asarray(white) == 0
    source = pixels(picture)
    assert not np.array_equal(outputs[0][kept], source[kept])  # the pipeline's own pixels there
    assert np.array_equal(outputs[1][kept], source[kept])
    assert np.array_equal(outputs[1][~kept], outputs[0][~kept])
    with pytest.raises(InvalidRequest, match="needs an image and a mask") as error:
        _resolved(loaded, prompt="a", image=_png(picture), paste_back=True)
    assert error.value.param == "paste_back"


def test_strength_runs_its_share_of_the_schedule(tiny_model_dir: Path) -> None:
    """An img2img job at strength 0.5 makes half the UNet calls of a full one, and its progress counts those."""
    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    calls: list[int] = []
    hook = loaded.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        image = _png(_picture(64, 64))
        with running_engine(loaded) as engine:
            for strength in (None, 1.0, 0.5, 0.25):
                body = {"prompt": "a", "num_inference_steps": 20, "guidance_scale": 0.0, "scheduler": "euler"}
                if strength is not None:
                    body |= {"image": image, "strength": strength}
                log = StepLog()
                calls.clear()
                engine.submit([_resolved(loaded, **body)], on_progress=log.callback("j"))[0].result(timeout=60)
                expected = round(20 * (strength or 1.0))
                assert len(calls) == expected, strength
                assert log.totals[-1] == expected and log.events[-1] == ("j", expected)
    finally:
        hook.remove()


def test_output_takes_the_inputs_size_rounded_down_or_the_size_asked(tiny_model_dir: Path) -> None:
    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    picture = _picture(101, 70)
    rounded = _resolved(loaded, prompt="a", image=_png(picture))
    assert (rounded.width, rounded.height) == (96, 64)
    asked = _resolved(loaded, prompt="a", image=_png(picture), width=64, height=80, seed=3, num_inference_steps=3)
    references = {"img2img": _reference(tiny_model_dir, StableDiffusionImg2ImgPipeline)}
    with running_engine(loaded) as engine:
        served = pixels(engine.generate(asked).image)
    assert served.shape == (80, 64, 3)
    # diffusers' img2img pipeline takes no size: it gets the picture resized as the server resizes it (its own
    # image processor's resize, Lanczos).
    resized = references["img2img"].image_processor.resize(picture, 80, 64)
    want = _expected(references, type(asked)(**{**asked.__dict__, "image": resized}))
    assert np.abs(served - want).max() <= TOLERANCE
    with pytest.raises(InvalidRequest, match=r"outside 64\.\.1024") as error:
        _resolved(loaded, prompt="a", image=_png(_picture(60, 60)))
    assert error.value.param == "image"


def _gif() -> str:
    return _png(_picture(64, 64), "GIF")


def _animated_png() -> str:
    frames = [_picture(64, 64, seed) for seed in range(2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    return base64.b64encode(buffer.getvalue()).decode()


def _truncated_png() -> str:
    data = base64.b64decode(_png(_picture(64, 64)))
    return base64.b64encode(data[: len(data) // 2]).decode()


def _oversized_text_chunk_png() -> str:
    """A small PNG whose compressed text chunk inflates past Pillow's limit: refused, not a 500."""
    import struct
    import zlib

    data = base64.b64decode(_png(_picture(8, 8)))
    payload = b"comment\x00\x00" + zlib.compress(b"x" * 3_000_000)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + payload) & 0xFFFFFFFF)
    return base64.b64encode(data[:33] + chunk + data[33:]).decode()


def _sixteen_bit_png() -> str:
    return _png(Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)))


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"image": "not base64!"}, "image", "not valid base64"),
        ({"image": base64.b64encode(b"hello, world").decode()}, "image", "not a PNG, JPEG or WebP image"),
        ({"image": _gif()}, "image", "is a GIF image"),
        ({"image": _animated_png()}, "image", "animated"),
        ({"image": _truncated_png()}, "image", "truncated or corrupt"),
        ({"image": _sixteen_bit_png()}, "image", "16-bit"),
        ({"image": _png(_picture(200, 200))}, "image", "more than --max_input_pixels 20000"),
        ({"image": _png(_picture()), "mask": _png(_mask(64, 64))}, "mask", "must match"),
        ({"image": _png(_picture()), "mask": "%%%"}, "mask", "not valid base64"),
        ({"mask": _png(_mask())}, "mask", "needs an image"),
        ({"strength": 0.5}, "strength", "needs an image"),
        ({"image": _png(_picture()), "strength": 0.1, "num_inference_steps": 5}, "strength", "leaves no step"),
        ({"image": _oversized_text_chunk_png()}, "image", "corrupt or has malformed metadata"),
        ({"image": _png(Image.new("L", (16400, 1)))}, "image", "a side is longer than 16384"),
    ],
)
def test_bad_images_are_400s_that_say_why(tiny_model_dir: Path, body: dict, param: str, words: str) -> None:
    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    limits = Limits(max_input_pixels=20_000).for_model(loaded.traits)
    with pytest.raises(InvalidRequest) as error:
        resolve(GenerationRequest(prompt="a", **body), limits, loaded.traits, prefix="instances[0].")
    assert error.value.param == f"instances[0].{param}"
    assert words in error.value.message


def test_malformed_exif_keeps_the_picture_and_transparency_masks_count(tiny_model_dir: Path) -> None:
    from predictor.images import decode_mask

    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    broken = _png(_picture(96, 64), exif=b"Exif\x00\x00garbage!!")
    assert _resolved(loaded, prompt="a", image=broken).image.size == (96, 64)  # orientation unknown: as stored
    grey = Image.new("L", (8, 8), 0)
    grey.info["transparency"] = 0  # tRNS: the grey value 0 is transparent
    mask = decode_mask(base64.b64decode(_png(grey, transparency=0)), "mask", 10_000, transparent_edits=True)
    assert np.asarray(mask).min() == 255  # every pixel transparent: every pixel edited


def test_half_precision_image_jobs_alone_equal_diffusers(tiny_model_dir: Path, inpaint_dir: Path) -> None:
    """float16 (the GPU's dtype), on the CPU: each image alone equals diffusers' float16 pipeline within one grey
    level (the VAE encodes image by image, the inpainting latents are contiguous as diffusers' are)."""
    image, mask = _png(_picture(64, 64)), _png(_mask(64, 64))
    for directory, kinds in ((tiny_model_dir, ("img2img", "inpaint")), (inpaint_dir, ("inpaint",))):
        loaded = load_pipeline(str(directory), "not/used", None, "cpu", "float16")
        references = {}
        for kind in kinds:
            cls = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionInpaintPipeline
            references[kind] = cls.from_pretrained(directory, dtype=torch.float16, safety_checker=None)
            references[kind].set_progress_bar_config(disable=True)
        cases = []
        for kind in kinds:
            for strength, scheduler in ((0.6, "euler_a"), (1.0, "dpmpp_2m")):
                body = {"prompt": "a", "seed": 4, "num_inference_steps": 5, "image": image, "strength": strength}
                cases.append(
                    _resolved(loaded, **body, scheduler=scheduler, **({"mask": mask} if kind == "inpaint" else {}))
                )
        with running_engine(loaded) as engine:
            for case in cases:
                served = pixels(engine.generate(case).image)
                assert np.abs(served - _expected(references, case)).max() <= TOLERANCE, (directory, case.mode)


@pytest.mark.parametrize(
    ("build", "cls", "masked"),
    [
        (build_tiny_sdxl, StableDiffusionXLImg2ImgPipeline, False),
        (build_tiny_sd3, StableDiffusion3InpaintPipeline, True),
        (build_tiny_flux_dev, FluxInpaintPipeline, True),
    ],
    ids=["sdxl-img2img", "sd3-inpaint", "flux-inpaint"],
)
def test_bfloat16_image_jobs_alone_equal_diffusers(build, cls, masked: bool, tmp_path: Path) -> None:
    """bfloat16, these families' dtype on CUDA, on the CPU: SDXL encodes in float32 whenever its VAE says
    force_upcast (as its img2img pipeline does in any dtype), and SD3's inpainting rows decode without the
    VAE's shift in one rounding, as its pipeline does."""
    build().save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path), "not/used", None, "cpu", "bfloat16")
    body = {"prompt": "p", "seed": 3, "num_inference_steps": 5, "image": _png(_picture(96, 64)), "scheduler": "euler"}
    body["guidance_scale"] = 4.0
    if masked:
        body |= {"mask": _png(_mask(96, 64)), "strength": 0.6}
    case = _resolved(loaded, **body)
    pipe = cls.from_pretrained(tmp_path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    want = diffusers_image_job(pipe, case)
    with running_engine(loaded) as engine:
        got = pixels(engine.generate(case, timeout=120).image)
    assert np.abs(got - want).max() <= TOLERANCE


def test_compiled_unet_takes_image_jobs_without_recompiling(tiny_model_dir: Path) -> None:
    """Image jobs' latents can come channels-last from the VAE: the compiled UNet and decoder take them as they
    take text jobs', with no graph compiled after warm-up."""
    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    image, mask = _png(_picture(64, 64)), _png(_mask(64, 64))
    jobs = [
        _resolved(loaded, prompt="t", seed=1, num_inference_steps=3),
        _resolved(loaded, prompt="i", seed=2, num_inference_steps=4, image=image),
        _resolved(loaded, prompt="m", seed=3, num_inference_steps=4, image=image, mask=mask, strength=0.5),
    ]
    with running_engine(loaded, max_batch_size=4, compile=True, compile_backend="eager") as engine:
        after_warmup = engine.runner.compiled_graphs()
        for future in engine.submit(jobs):  # together: their rows share calls
            future.result(timeout=60)
        for job in jobs:  # alone: an image job's own rows only
            engine.generate(job, timeout=60)
        assert engine.runner.compiled_graphs() == after_warmup, "an image job compiled a graph after warm-up"


def test_four_channel_inpainting_steps_are_not_host_free(tiny_model_dir: Path) -> None:
    from predictor.config import EngineConfig
    from predictor.runner import DiffusionRunner

    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    runner = DiffusionRunner(loaded, EngineConfig())
    runner.device_runs_ahead = True  # as on CUDA
    image, mask = _png(_picture(64, 64)), _png(_mask(64, 64))
    text = _resolved(loaded, prompt="a", scheduler="euler")
    inpaint = _resolved(loaded, prompt="a", scheduler="euler", image=image, mask=mask)
    assert runner.leaves_host_free([text]) and not runner.leaves_host_free([text, inpaint])


def test_image_modes_convert_and_exif_orientation_holds(tiny_model_dir: Path) -> None:
    loaded = load_pipeline(str(tiny_model_dir), "not/used", None, "cpu", "float32")
    picture = _picture(96, 64)
    for image in (picture.convert("RGBA"), picture.convert("P"), picture.convert("L"), picture.convert("CMYK")):
        fmt = "JPEG" if image.mode == "CMYK" else "PNG"
        resolved = _resolved(loaded, prompt="a", image=_png(image, fmt))
        assert resolved.image.mode == "RGB" and resolved.image.size == (96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    rotated = _resolved(loaded, prompt="a", image=_png(picture, "JPEG", exif=exif))
    assert (rotated.width, rotated.height) == (64, 96)


@pytest.mark.parametrize(
    ("build", "text", "img2img", "inpaint"),
    [
        (build_tiny_flux_dev, FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline),
        (build_tiny_sd3, StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline),
        (build_tiny_zimage, ZImagePipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline),
        (build_tiny_qwenimage, QwenImagePipeline, QwenImageImg2ImgPipeline, QwenImageInpaintPipeline),
    ],
    ids=["flux-dev", "sd3", "zimage", "qwenimage"],
)
def test_flow_matching_image_jobs_equal_diffusers_beside_text_jobs(
    build, text, img2img, inpaint, tmp_path: Path
) -> None:
    """FLUX, SD3 and Z-Image start an image job from the picture's latents noised by the scheduler's scale_noise,
    at their own strength rounding (the start step rounded down) and default strength (0.6); inpainting puts the
    noised picture back outside the mask after every step (and SD3's pipeline decodes its inpainting without the
    VAE's shift, which the server reproduces)."""
    build().save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path), "not/used", None, "cpu", "float32")
    traits = loaded.traits
    assert traits.modes == {"text", "img2img", "inpaint"} and traits.default_strength["img2img"] == 0.6
    pipes = {"img2img": _reference(tmp_path, img2img), "inpaint": _reference(tmp_path, inpaint)}
    image, mask = _png(_picture(96, 64)), _png(_mask(96, 64))
    cases = []
    for i, scheduler in enumerate(traits.image_schedulers * 3):
        body = {"prompt": f"p{i}", "seed": i, "num_inference_steps": 5 + i, "scheduler": scheduler, "image": image}
        if traits.guidance == "none":  # Qwen-Image guides by true CFG, against a negative prompt (scale 4)
            body["negative_prompt"] = [None, "dull"][i % 2]
        else:
            body["guidance_scale"] = [1.0, 4.0][i % 2]
        body["strength"] = [0.45, 1.0, 0.6][i % 3]
        if i % 2:
            body["mask"] = mask
        cases.append(_resolved(loaded, **body))
        cases.append(_resolved(loaded, prompt=f"text {i}", seed=20 + i, num_inference_steps=4, width=96))
    expected = []
    for case in cases:
        if case.image is None:
            text_pipe = text(**pipes["img2img"].components)
            text_pipe.set_progress_bar_config(disable=True)
            expected.append(diffusers_image(text_pipe, case))
            continue
        expected.append(diffusers_image_job(pipes[case.mode], case))
    with running_engine(loaded, max_batch_size=8) as engine:
        served = [pixels(future.result(timeout=120).image) for future in engine.submit(cases)]
    for got, want in zip(served, expected, strict=True):
        assert np.abs(got - want).max() <= TOLERANCE
    unusable = [name for name in traits.schedulers if name not in traits.image_schedulers]
    for name in unusable:  # DPM-Solver and UniPC have no scale_noise: diffusers' pipelines could not run them
        with pytest.raises(InvalidRequest, match="cannot start from an image") as error:
            _resolved(loaded, prompt="a", image=image, scheduler=name)
        assert error.value.param == "scheduler"


def test_sdxl_img2img_and_inpainting_equal_diffusers(tiny_sdxl_dir: Path) -> None:
    """SDXL's img2img (strength 0.3 by default) and inpainting (0.9999), as StableDiffusionXLImg2ImgPipeline and
    StableDiffusionXLInpaintPipeline: the picture encoded by the float32 VAE copy (force_upcast), normalised for
    img2img and only scaled for inpainting, beside a text job."""
    loaded = load_pipeline(str(tiny_sdxl_dir), "not/used", None, "cpu", "float32")
    traits = loaded.traits
    assert traits.modes == {"text", "img2img", "inpaint"}
    assert (traits.default_strength["img2img"], traits.default_strength["inpaint"]) == (0.3, 0.9999)
    references = {
        "img2img": _reference(tiny_sdxl_dir, StableDiffusionXLImg2ImgPipeline),
        "inpaint": _reference(tiny_sdxl_dir, StableDiffusionXLInpaintPipeline),
        "text": _reference(tiny_sdxl_dir, StableDiffusionXLPipeline),
    }
    image, mask = _png(_picture(96, 64)), _png(_mask(96, 64))
    cases = []
    for i, scheduler in enumerate(SCHEDULER_NAMES):
        body = {"prompt": f"p{i}", "seed": i, "num_inference_steps": 6, "scheduler": scheduler, "image": image}
        body["guidance_scale"] = [1.0, 5.0][i % 2]
        if i % 3 == 1:
            body["strength"] = 0.7
        if i % 2:
            body["mask"] = mask
        cases.append(_resolved(loaded, **body))
    cases.append(_resolved(loaded, prompt="text", seed=30, num_inference_steps=4, width=96))
    assert {case.mode for case in cases} == {"text", "img2img", "inpaint"}
    _mixed(loaded, references, cases)


def test_image_routes_on_a_server(tmp_path: Path) -> None:
    """Every protocol takes an image; image routes take bodies past --max_body_bytes up to --max_image_bytes; the
    OpenAI SDK's images.edit with a transparent-area mask equals /generate with that area white."""
    import openai

    port = free_port()
    log = tmp_path / "server.log"
    flags = ("--default_steps", "3", "--max_body_bytes", "4096", "--max_image_bytes", "200000")
    process = start_server(
        "--model_id", "builtin:tiny", "--model_dir", str(tmp_path / "none"), *flags, port=port, log=log
    )
    base = f"http://127.0.0.1:{port}"
    picture, white = _picture(96, 64), _mask(96, 64)
    image = _png(picture)
    assert len(image) > 4096
    try:
        wait_ready(process, port, log)
        body = {"prompt": "a boat", "image": image, "mask": _png(white), "seed": 11}
        generated = httpx.post(f"{base}/generate", json=body, timeout=60)
        assert generated.status_code == 200, generated.text
        assert decode_image(generated.content).shape == (64, 96, 3)
        v1 = httpx.post(f"{base}/v1/models/sd:predict", json={"instances": [body, {"prompt": "x"}]}, timeout=60)
        assert v1.status_code == 200 and [p["width"] for p in v1.json()["predictions"]] == [96, 64]
        tensors = [
            {"name": name, "shape": [1], "datatype": "BYTES", "data": [body[name]]} for name in ("prompt", "image")
        ]
        v2 = httpx.post(f"{base}/v2/models/sd/infer", json={"inputs": tensors}, timeout=60)
        assert v2.status_code == 200, v2.text

        # OpenAI's convention: the fully transparent pixels are the area to edit.
        openai_mask = Image.new("RGBA", picture.size, (0, 0, 0, 255))
        openai_mask.putalpha(Image.fromarray(255 - np.asarray(white)))
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        files = {
            "image": ("boat.png", base64.b64decode(image), "image/png"),
            "mask": ("mask.png", base64.b64decode(_png(openai_mask)), "image/png"),
        }
        edited = client.images.edit(**files, prompt="a boat", n=2, extra_body={"seed": 11})
        assert [item.model_extra["seed"] for item in edited.data] == [11, 12]
        first = decode_image(base64.b64decode(edited.data[0].b64_json))
        assert np.abs(first - decode_image(generated.content)).max() <= TOLERANCE
        with pytest.raises(openai.BadRequestError) as error:
            client.images.edit(
                image=files["image"], mask=("m.png", base64.b64decode(_png(white)), "image/png"), prompt="a"
            )
        assert "no alpha channel" in error.value.body["message"]

        # Body limits: the image routes take up to --max_image_bytes, the others --max_body_bytes.
        too_big = {"prompt": "x" * 5000}
        assert httpx.post(f"{base}/v1/images/generations", json=too_big).status_code == 413
        huge = httpx.post(f"{base}/generate", json={"prompt": "a", "image": "A" * 250_000})
        assert huge.status_code == 413 and "--max_image_bytes" in huge.json()["error"]
        form = httpx.post(f"{base}/v1/images/edits", json={"prompt": "a"})
        assert form.status_code == 400 and "multipart/form-data" in form.json()["error"]["message"]
        boundary = "b0undary"

        def chunks():  # a chunked body, so only the running count can stop it
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n'.encode()
            for _ in range(30):
                yield b"x" * 10_000

        chunked = httpx.post(
            f"{base}/v1/images/edits",
            content=chunks(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert chunked.status_code == 413, chunked.text
        auto = client.images.edit(image=files["image"], prompt="a boat", size="auto", extra_body={"seed": 1})
        assert decode_image(base64.b64decode(auto.data[0].b64_json)).shape == (64, 96, 3)
    finally:
        assert stop_server(process) == 0


def test_sdxl_checkpoint_with_aesthetic_conditioning_is_refused_at_load(tmp_path: Path) -> None:
    pipe = build_tiny_sdxl_inpaint()
    pipe.register_to_config(requires_aesthetics_score=True)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    from predictor.errors import LoadError

    with pytest.raises(LoadError, match="aesthetic score"):
        load_pipeline(str(tmp_path), "not/used", None, "cpu", "float32")
