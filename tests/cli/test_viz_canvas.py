"""Issue 10, item 10: single-panel pictures (PruMerge, SPD) fill their canvas; the footer wraps."""

import numpy as np
from PIL import Image

from focusvlm import viz
from focusvlm.compress.prumerge_method import prumerge_panel
from focusvlm.compress.spd_method import window_panel


def _blank_columns(picture, top, bottom):
    """Share of columns that are pure white between rows top..bottom."""
    a = np.asarray(picture.convert("RGB"))[top:bottom]
    return float((a.min(axis=(0, 2)) == 255).mean())


def test_single_panel_canvas_is_as_wide_as_the_panel():
    image = Image.new("RGB", (336, 336), (90, 120, 60))
    panel = window_panel((24, 24), 2)
    footer = ("576 patches -> 144 image tokens to the LLM (SPDConfig; white outline = kept as is, tint = merged "
              "group, dark = dropped)")
    picture = viz.render(image, (24, 24), [panel], footer)
    assert picture.width == 336 + 2 * 8  # the panel and its margins, not the footer's one-line length
    # the image row is filled edge to edge (margins aside): no blank half
    assert _blank_columns(picture, 30, 330) < 0.06
    # every word of the footer is drawn, over several lines inside the canvas
    assert picture.height > 336 + 22 + 2 * 12


def test_prumerge_panel_has_the_same_geometry():
    import torch

    image = Image.new("RGB", (112, 112), (200, 10, 10))
    record = {"kept": torch.tensor([[0, 5, 9]]), "neighbours": torch.tensor([[[1, 2], [6, 7], [10, 11]]])}
    panel = prumerge_panel(record, 64)
    picture = viz.render(image, (8, 8), [panel], "word " * 120)
    assert picture.width == 112 + 16 and _blank_columns(picture, 30, 120) < 0.2
