"""Text processors the server loads in place of a checkpoint's own, where transformers would need more than the
server uses."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class PixtralTextProcessor(ProcessorMixin):
    """FLUX.2-dev's ``tokenizer`` (a ``PixtralProcessor``), for text alone: the same chat template and tokenizer,
    through transformers' own ``ProcessorMixin`` calls, without its image processor.

    transformers refuses to build a ``PixtralProcessor`` without torchvision, for its image processor. The server
    never gives it an image: FLUX.2-dev's reference images go through the VAE, and only the pipeline's caption
    upsampling (not served) shows images to the encoder. So the checkpoint's ``tokenizer`` folder is loaded with
    this class, and the server needs no torchvision."""

    text_kwargs: ClassVar[dict[str, Any]] = {"return_tensors": "pt"}  # PixtralProcessor's text defaults

    def __init__(self, tokenizer: Any = None, chat_template: str | None = None, **processor_config: Any) -> None:
        # processor_config.json's image fields (patch_size, image_token, ...) are for images: not used here.
        super().__init__(tokenizer, chat_template=chat_template)


class QwenVLImageProcessor(Qwen2VLProcessor):
    """Qwen-Image-Edit's ``processor`` (a ``Qwen2VLProcessor``) for prompts and still images: the same tokenizer,
    image processor and ``<|image_pad|>`` expansion (transformers' own ``Qwen2VLProcessor.__call__``), without the
    video processor, which transformers builds only with torchvision. The edit pipelines never give it a video."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **_: Any):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
