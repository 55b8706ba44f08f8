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

from .compress import vmtc

DROPPED, PRIMARY, MERGED = 0, 1, 2


@dataclass
class Panel:
    """One picture panel: per original patch (raster order) its state and group id."""

    title: str
    state: np.ndarray   # (n0,) DROPPED / PRIMARY / MERGED
    group: np.ndarray   # (n0,) cluster (VMTC), absorbing token (PruMerge) or window (SPD); -1 if none


def vmtc_panels(records: list[vmtc.StageRecord], layers: list[int], sample: int = 0) -> list[Panel]:
    """Per stage: which original patches are primary, merged (with cluster id) or already dropped."""
    n0 = records[0].importance.shape[1]
    owner = torch.arange(n0).unsqueeze(0)
    panels = []
    for layer, rec in zip(layers, records):
        rec = vmtc.StageRecord(*(t[sample:sample + 1].cpu() for t in (rec.importance, rec.primary, rec.redundant,
                                                                      rec.labels)))
        n_in = rec.importance.shape[1]
        kind = torch.full((n_in,), DROPPED)
        kind[rec.primary[0]] = PRIMARY
        cluster = torch.full((n_in,), -1)
        if rec.labels.numel():
            kind[rec.redundant[0]] = MERGED
            cluster[rec.redundant[0]] = rec.labels[0]
        o = owner[0]
        alive = o >= 0
        state = torch.where(alive, kind[o.clamp_min(0)], torch.tensor(DROPPED))
        group = torch.where(alive, cluster[o.clamp_min(0)], torch.tensor(-1))
        kept = rec.primary.shape[1] + (int(rec.labels.max()) + 1 if rec.labels.numel() else 0)
        panels.append(Panel(f"layer {layer}: {n_in} -> {kept}", state.numpy(), group.numpy()))
        owner = vmtc.owners_after(owner, rec)
    return panels


def merged_panel(record, frame: int = 0) -> Panel:
    """VMTC after a patch merger (``vmtc_merged.MergedRecord``), one frame: per merged token (raster order of
    the merged grid) primary, merged into a cluster (its id) or dropped (prune_only)."""
    n = record.importance.shape[1]
    state = np.full(n, DROPPED)
    group = np.full(n, -1)
    state[record.primary[frame].cpu().numpy()] = PRIMARY
    if record.labels.numel():
        redundant = record.redundant[frame].cpu().numpy()
        state[redundant] = MERGED
        group[redundant] = record.labels[frame].cpu().numpy()
    return Panel(f"after the merger: {n} -> {record.sources.shape[1]}", state, group)


def _field(record, name: str):
    return record[name] if isinstance(record, dict) else getattr(record, name)


def prumerge_panel(record, num_patches: int, sample: int = 0, plus: bool = False) -> Panel:
    """PruMerge(+) (``prumerge.PruMergeRecord`` or a dict with kept / neighbours):
    kept patches outlined; each kept token's merged neighbours tinted with its
    colour (a patch several kept tokens absorb shows its nearest claim); every
    other pruned patch flows into the one extra token, tinted with one more colour."""
    kept = _field(record, "kept")[sample].cpu()
    near = _field(record, "neighbours")[sample].cpu()
    state = np.full(num_patches, MERGED)
    group = np.full(num_patches, len(kept))          # the extra token (sum of the pruned patches)
    for slot in range(near.shape[1] - 1, -1, -1):  # the closest neighbour wins where sets overlap
        group[near[:, slot].numpy()] = np.arange(len(kept))
    pruned = record.get("pruned") if isinstance(record, dict) else record.pruned
    if pruned is not None:  # positions the official complement skips (duplicate picks) reach no token
        reached = np.zeros(num_patches, dtype=bool)
        for positions in (pruned[sample].cpu(), kept, near.flatten()):
            reached[positions.numpy()] = True
        state[~reached], group[~reached] = DROPPED, -1
    state[kept.numpy()] = PRIMARY
    group[kept.numpy()] = np.arange(len(kept))
    return Panel(f"PruMerge{'+' if plus else ''}: {num_patches} -> {len(kept) + 1}", state, group)


def visionzip_panel(record, num_patches: int, sample: int = 0) -> Panel:
    """VisionZip (``visionzip.VisionZipRecord``; positions count CLS as 0): dominant patches outlined,
    each contextual token's target and members tinted with one colour."""
    dom = _field(record, "dominant")[sample].cpu().numpy()
    ctx = _field(record, "contextual")[sample].cpu().numpy()
    merged = _field(record, "merged")[sample].cpu().numpy()
    into = _field(record, "merged_into")[sample].cpu().numpy()
    state = np.full(num_patches, DROPPED)
    group = np.full(num_patches, -1)
    patch = lambda pos: pos[pos > 0] - 1  # noqa: E731  (CLS has no patch)
    state[patch(dom)] = PRIMARY
    for slot, pos in enumerate(ctx):
        if pos > 0:
            state[pos - 1], group[pos - 1] = MERGED, slot
    for pos, slot in zip(merged, into):
        if pos > 0:
            state[pos - 1], group[pos - 1] = MERGED, slot
    return Panel(f"VisionZip: {num_patches} -> {len(dom)} + {len(ctx)}", state, group)


def divprune_panel(record, num_patches: int, sample: int = 0, offset: int = 0) -> Panel:
    """DivPrune (``divprune.DivPruneRecord``): kept patches outlined, the rest dropped. ``offset`` = 1 when
    the projected tokens start with CLS."""
    kept = _field(record, "kept")[sample].cpu().numpy() - offset
    state = np.full(num_patches, DROPPED)
    state[kept[kept >= 0]] = PRIMARY
    return Panel(f"DivPrune: {num_patches + offset} -> {len(kept)}", state, np.full(num_patches, -1))


def spd_panel(grid: tuple[int, int], factor: int) -> Panel:
    h, w = grid
    ys, xs = np.divmod(np.arange(h * w), w)
    windows = (ys // factor) * (-(-w // factor)) + xs // factor
    return Panel(f"SPD x{factor}: {h * w} -> {int(windows.max()) + 1}", np.full(h * w, MERGED), windows)


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
