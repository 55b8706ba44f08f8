"""A family's processor from a folder or hub id, also where its video processor cannot be built.

transformers 5 builds every sub-processor a processor class declares, and the video processors
of Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision need torchvision. Without torchvision
``AutoProcessor.from_pretrained`` fails for these families although nothing focusvlm does with
images needs a video processor. ``load_processor`` then builds the same processor class without
it: the checkpoint's tokenizer, image processor, chat template and settings, loaded by the stock
code; only ``video_processor`` is left out. Such a processor refuses videos by name (instead of
silently dropping them) and saves as the stock class, so the folder it writes loads in full
where torchvision is installed.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

from .base import UnsupportedModelError

_IMAGES_ONLY: dict[type, type] = {}


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _is_video(attribute: str) -> bool:
    return "video" in attribute


def images_only_class(stock: type) -> type:
    """``stock`` (a transformers processor class) without its video processor; one class per stock class."""
    if stock in _IMAGES_ONLY:
        return _IMAGES_ONLY[stock]

    class ImagesOnly(stock):
        # the attribute list drives loading, __init__'s argument check and saving alike: leaving the
        # video processor out of it leaves it out of all three
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if not _is_video(a)]

        @classmethod
        def from_args_and_dict(cls, args, processor_dict, **kwargs):
            # a checkpoint's processor_config.json also holds the video processor's settings
            dropped = [a for a in stock.get_attributes() if _is_video(a)]
            processor_dict = {k: v for k, v in processor_dict.items() if k not in dropped}
            return super().from_args_and_dict(args, processor_dict, **kwargs)

        def __call__(self, *args: Any, **kwargs: Any):
            videos = kwargs.get("videos", args[2] if len(args) > 2 else None)
            if videos is not None:
                raise UnsupportedModelError(f"this {stock.__name__} was loaded without its video processor, "
                                            "which needs torchvision: pip install torchvision to process videos")
            return super().__call__(*args, **kwargs)

    # saved as the stock class, so the folder loads in full once torchvision is there
    ImagesOnly.__name__ = ImagesOnly.__qualname__ = stock.__name__
    ImagesOnly.__doc__ = f"{stock.__name__} without its video processor (no torchvision): images only."
    _IMAGES_ONLY[stock] = ImagesOnly
    return ImagesOnly


def load_processor(source: Any, stock: type, title: str, **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained(source)``; without torchvision, ``stock`` minus its video processor.

    Raises UnsupportedModelError naming torchvision when neither can be built (e.g. a folder
    with no tokenizer), with both reasons.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here; torchvision decides
        if torchvision_available():
            raise
        stock_error = exc
    try:
        processor = images_only_class(stock).from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(
            f"{title}'s processor needs torchvision (its video processor): pip install torchvision. Without it "
            f"focusvlm builds an images-only {stock.__name__}, which failed too for {source}: "
            f"{_first_line(exc)}") from stock_error
    warnings.warn(f"torchvision is not installed: {title}'s processor was loaded without its video processor "
                  "(images work; videos need pip install torchvision)", stacklevel=2)
    return processor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]
