"""Token-map pictures: which image patches survive a vision-side reduction.

Panel per VMTC stage: primary patches outlined in white, patches merged into
a cluster token tinted with that cluster's colour, dropped patches darkened.
PruMerge: kept patches outlined, absorbed patches tinted like the kept token
that took them. VisionZip: dominant patches outlined, each contextual token's
patches tinted. DivPrune: kept patches outlined. SPD: each pooling window
tinted as one token. VMTC after a patch merger (Qwen): one panel on the
merged-token grid, each cell 2x2 patches. The last line of every picture
gives the token count the LLM receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DROPPED, PRIMARY, MERGED = 0, 1, 2


@dataclass
class Panel:
    """One picture panel: per original patch (raster order) its state and group id."""

    title: str
    state: np.ndarray   # (n0,) DROPPED / PRIMARY / MERGED
    group: np.ndarray   # (n0,) cluster (VMTC), absorbing token (PruMerge) or window (SPD); -1 if none


def record_field(record, name: str):
    """A field of a method's record, kept as a dataclass or as a plain dict (a record saved as JSON)."""
    return record[name] if isinstance(record, dict) else getattr(record, name)


def _palette(k: int) -> np.ndarray:
    rng = np.random.RandomState(1234)  # fixed so the same cluster id always has the same colour
    hues = (np.arange(max(k, 1)) * 0.61803398875) % 1.0
    rng.shuffle(hues)
    import colorsys

    return np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]) * 255


def render(image, grid: tuple[int, int], panels: list[Panel], footer: str, cell: int = 0):
    """Draw the panels side by side over ``image`` (PIL image, already the size the model saw)."""
    import textwrap

    from PIL import Image, ImageDraw

    h, w = grid
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    H, W = base.shape[:2]
    ch, cw = H / h, W / w
    pad, title_h, glyph_w, line_h = 8, 22, 6, 12  # PIL's default bitmap font: about 6 x 11 px per glyph
    # the canvas is as wide as the panels; the footer wraps to it instead of widening it (a single panel
    # with a one-line footer used to leave half the picture blank)
    width = len(panels) * (W + pad) + pad
    footer_lines = textwrap.wrap(footer, max(20, (width - 2 * pad) // glyph_w)) or [""]
    canvas = Image.new("RGB", (width, H + title_h + 2 * pad + line_h * len(footer_lines)), "white")
    draw_all = ImageDraw.Draw(canvas)
    for p_i, panel in enumerate(panels):
        colours = _palette(int(panel.group.max()) + 1)
        tile = base.copy()
        for idx in range(h * w):
            y0, x0 = int(idx // w * ch), int(idx % w * cw)
            y1, x1 = int((idx // w + 1) * ch), int((idx % w + 1) * cw)
            if panel.state[idx] == DROPPED:
                tile[y0:y1, x0:x1] *= 0.25
            elif panel.state[idx] == MERGED and panel.group[idx] >= 0:
                tile[y0:y1, x0:x1] = 0.45 * tile[y0:y1, x0:x1] + 0.55 * colours[panel.group[idx]]
        img = Image.fromarray(tile.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for idx in np.nonzero(panel.state == PRIMARY)[0]:
            y0, x0 = int(idx // w * ch), int(idx % w * cw)
            draw.rectangle([x0, y0, int(x0 + cw) - 1, int(y0 + ch) - 1], outline=(255, 255, 255), width=1)
        x = pad + p_i * (W + pad)
        canvas.paste(img, (x, title_h))
        draw_all.text((x, 5), panel.title, fill=(0, 0, 0))
    for i, line in enumerate(footer_lines):
        draw_all.text((pad, H + title_h + 6 + i * line_h), line, fill=(0, 0, 0))
    return canvas


def denormalize(pixel_values: torch.Tensor, mean, std):
    """The picture the model saw, back from processor-normalised pixel values (3, H, W)."""
    from PIL import Image

    x = pixel_values.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
