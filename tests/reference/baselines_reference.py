"""Slow literal oracle for SPD, one image at a time with loops (PruMerge's is in peers_reference.py)."""

from __future__ import annotations

import math


def spd(x, h, w, f):
    """x: list of h*w feature lists (raster). Mean over each f x f window, edge windows partial."""
    out = []
    for by in range(math.ceil(h / f)):
        for bx in range(math.ceil(w / f)):
            cells = [x[y * w + xx] for y in range(by * f, min(h, by * f + f)) for xx in range(bx * f, min(w, bx * f + f))]
            out.append([sum(c[d] for c in cells) / len(cells) for d in range(len(x[0]))])
    return out
