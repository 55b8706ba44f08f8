"""What needs no download besides the demo model: the random-weight presets and the bundled pictures.

* ``random_llava(preset)`` (from ``models.llava``) builds a LLaVA-1.5-shaped model with random
  weights from an embedded config (tests, benchmarks); ``llava_config``, ``PRESETS``, ``Preset`` with it.
* ``demo_image_path(name)``: a picture shipped with the package.

The embedded demo model (``--model demo``) is ``focusvlm.models.demo``.
"""

from __future__ import annotations

from pathlib import Path

# the random-weight presets belong to the LLaVA adapter; importable from here as before
from .llava import PRESETS, Preset, llava_config, random_llava  # noqa: F401

BUNDLED_IMAGES = {"astronaut": "astronaut.jpg", "chelsea": "chelsea.jpg", "coffee": "coffee.jpg",
                  "easyvqa": "easyvqa_test_2.png"}


def demo_image_path(name: str = "astronaut") -> Path:
    """A picture shipped with the package: public-domain scikit-image photos (astronaut, chelsea, coffee)
    and an easy-VQA test picture (easyvqa; MIT licence, assets/EASY_VQA_LICENSE)."""
    if name not in BUNDLED_IMAGES:
        raise FileNotFoundError(f"no bundled image {name!r}; have: {', '.join(BUNDLED_IMAGES)}")
    return Path(__file__).resolve().parent.parent / "assets" / BUNDLED_IMAGES[name]


__all__ = ["BUNDLED_IMAGES", "PRESETS", "Preset", "demo_image_path", "llava_config", "random_llava"]
