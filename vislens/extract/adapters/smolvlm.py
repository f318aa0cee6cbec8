"""SmolVLM and SmolVLM2 (``smolvlm``): Idefics3's architecture (SigLIP tiles + pixel-shuffle connector + SmolLM2).

Everything about the model is Idefics3's (`vislens.extract.adapters.idefics3`): tiles of
``image_seq_len`` ``<image>`` tokens with ``<fake_token_around_image>`` / ``<row_i_col_j>`` /
``<global-img>`` markers between the runs, the language model at ``model.model.text_model``.

What differs is the processor: transformers' `SmolVLMProcessor` needs a video processor (which
transformers builds only where torchvision is installed) and the ``num2words`` package (only to
write video frame counts). vislens feeds no videos, so it loads the processor without either
(`image_text_processor`); images and text go through `SmolVLMProcessor`'s own code.
"""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar

from vislens.extract.adapters.idefics3 import Idefics3Adapter


@cache
def image_text_processor() -> type:
    """`SmolVLMProcessor` with an image processor and a tokenizer only (no video processor, no ``num2words``).

    Its ``from_pretrained`` loads any SmolVLM / SmolVLM2 checkpoint.
    """
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextSmolVLMProcessor(SmolVLMProcessor):
        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            image_seq_len: int = 169,
            chat_template: str | None = None,
            **kwargs: Any,
        ):
            # SmolVLMProcessor.__init__ without the num2words check and the video processor
            self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        # SmolVLM's own reads the video processor's frame defaults; images need none of it
        apply_chat_template = ProcessorMixin.apply_chat_template

    return ImageTextSmolVLMProcessor


class SmolVLMAdapter(Idefics3Adapter):
    """``HuggingFaceTB/SmolVLM-Instruct``, ``HuggingFaceTB/SmolVLM-256M-Instruct``, ``HuggingFaceTB/SmolVLM2-2.2B-Instruct``."""

    family: ClassVar[str] = "smolvlm"
    model_types: ClassVar[tuple[str, ...]] = ("smolvlm",)
    hub_ids: ClassVar[tuple[str, ...]] = (
        "HuggingFaceTB/SmolVLM-Instruct",
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        "HuggingFaceTB/SmolVLM-500M-Instruct",
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    )
    nested_images: ClassVar[bool] = True

    @classmethod
    def model_class(cls) -> type:
        """`SmolVLMForConditionalGeneration`."""
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration

    @classmethod
    def load_processor(cls, name_or_path: str, revision: str | None) -> Any:
        """The checkpoint's image processor, tokenizer and chat template (see `image_text_processor`)."""
        return image_text_processor().from_pretrained(name_or_path, revision=revision)
