"""CLIP-style tower pretraining: the loss against slow references, caption matching, a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("easy_vqa")

from focusvlm.demo import data as D  # noqa: E402
from focusvlm.demo import tower as T  # noqa: E402


def _reference_soft_clip(logits, matches):
    """Literal: per row, target probability 1/k on each of its k matches; cross-entropy; both directions."""
    B = logits.shape[0]

    def direction(lg, m):
        total = 0.0
        for i in range(B):
            targets = [j for j in range(B) if m[i][j]]
            norm = math.log(sum(math.exp(lg[i][j]) for j in range(B)))
            total += sum(-(lg[i][j] - norm) / len(targets) for j in targets)
        return total / B

    lg, m = logits.tolist(), matches.tolist()
    lgT = [[lg[i][j] for i in range(B)] for j in range(B)]
    mT = [[m[i][j] for i in range(B)] for j in range(B)]
    return (direction(lg, m) + direction(lgT, mT)) / 2


def test_soft_clip_loss_is_clips_loss_for_distinct_pairs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=g, dtype=torch.float64) * 3
    eye = torch.eye(6, dtype=torch.bool)
    clip = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(T.soft_clip_loss(logits, eye), clip)


def test_soft_clip_loss_matches_the_literal_reference_with_duplicates():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([[0, 1], [0, 1], [2, 0], [3, 2], [2, 0]])
    attrs = torch.tensor([[0, 1], [0, -1], [-1, 0], [3, 2], [2, -1]])
    matches = T.caption_matches(labels, attrs)
    logits = torch.randn(5, 5, generator=g, dtype=torch.float64) * 2
    assert T.soft_clip_loss(logits, matches).item() == pytest.approx(_reference_soft_clip(logits, matches), rel=1e-12)


def test_caption_matches_against_a_loop():
    g = torch.Generator().manual_seed(2)
    labels = torch.stack([torch.randint(0, 8, (12,), generator=g), torch.randint(0, 3, (12,), generator=g)], 1)
    attrs = labels.clone()
    attrs[::3, 0] = -1
    attrs[1::3, 1] = -1
    got = T.caption_matches(labels, attrs)
    for i in range(12):
        for j in range(12):
            want = (attrs[j, 0] in (-1, labels[i, 0])) and (attrs[j, 1] in (-1, labels[i, 1]))
            assert bool(got[i, j]) == bool(want)
    assert got.diagonal().all()  # every caption is drawn from its own image


def test_draw_caption_attributes_agree_with_the_text():
    rng = random.Random(0)
    kinds = set()
    for _ in range(200):
        c, s = rng.randrange(8), rng.randrange(3)
        text, ca, sa = T.draw_caption(c, s, rng, 0.5)
        assert ca in (-1, c) and sa in (-1, s) and (ca, sa) != (-1, -1)
        assert (D.COLORS[c] in text) == (ca == c) and (D.SHAPES[s] in text) == (sa == s)
        kinds.add((ca == -1, sa == -1))
    assert kinds == {(False, False), (True, False), (False, True)}


def test_vocab_encodes_with_eos_and_rejects_unknown_words():
    vocab = T.WordVocab()
    ids, mask = vocab.encode(["A red circle.", "There is a teal triangle in the image."])
    assert ids[0, mask[0].sum() - 1] == vocab.ids[T.EOS] and ids[1, -1] == vocab.ids[T.EOS]
    assert mask[0].tolist() == [1, 1, 1, 1] + [0] * (ids.shape[1] - 4)
    with pytest.raises(ValueError, match="purple"):
        vocab.encode(["A purple circle."])


def test_pretrain_tower_end_to_end_tiny(tmp_path):
    """Two steps on 40 images: files written, report filled, the saved tower reloads to the same outputs."""
    from focusvlm.models.demo import vision as V

    recipe = T.TowerRecipe(epochs=1, batch_size=20, train_images=40, test_images=30, probe_steps=3, warmup_steps=1)
    report = T.pretrain_tower(tmp_path / "tower", recipe, log=lambda s: None)
    assert report.steps == 2 and math.isfinite(report.loss_last)
    assert set(report.zero_shot) == {"color", "shape", "color+shape"}
    assert report.tower_parameters == sum(p.numel() for p in V.fresh_tower(V.tower_config()).parameters())
    saved = json.loads((tmp_path / "tower" / "tower_report.json").read_text())
    assert saved["recipe"]["train_images"] == 40
    tower, processor = V.load_tower(tmp_path / "tower")
    geometry = tower.config
    assert (geometry.image_size // geometry.patch_size) ** 2 == 64
    px, y, ids = T.load_split_pixels("test", processor, [0, 1, 2])
    assert px.shape == (3, 3, 64, 64) and ids == [0, 1, 2]
    feats = T.llava_features(tower, px)
    assert feats.shape == (3, 2 * geometry.hidden_size)
    again, _ = V.load_tower(tmp_path / "tower")
    assert torch.equal(T.llava_features(again, px), feats)


def test_random_shift_is_a_translation_with_repeated_borders():
    g = torch.Generator().manual_seed(3)
    px = torch.randn(5, 3, 9, 9, generator=g)
    out = T.random_shift(px, 2, torch.Generator().manual_seed(4))
    assert out.shape == px.shape

    def shifted(img, dy, dx):  # literal: output (y, x) reads input (y + dy, x + dx) clamped into the picture
        return torch.stack([torch.stack([img[:, min(max(y + dy, 0), 8), min(max(x + dx, 0), 8)] for x in range(9)], -1)
                            for y in range(9)], -2)

    for i in range(5):
        assert any(torch.equal(out[i], shifted(px[i], dy, dx)) for dy in range(-2, 3) for dx in range(-2, 3))
    assert not all(torch.equal(out[i], px[i]) for i in range(5))


def test_repaint_reproduces_the_picture_in_its_own_colour_and_moves_only_the_shape(tmp_path):
    raw, y, _ = T.load_split_raw("train", list(range(12)))
    bg, alpha = T.paint_layers(raw, y[:, 0])
    assert (T.repaint(bg, alpha, y[:, 0]) - raw).abs().max() <= 1.5  # rounding of the 8-bit PNG
    other = (y[:, 0] + 3) % len(D.COLORS)
    painted = T.repaint(bg, alpha, other)
    background = alpha == 0
    assert torch.equal(painted.permute(0, 2, 3, 1)[background], bg[:, None, None, :].expand(-1, 64, 64, -1)[background])
    interior = alpha > 0.999
    palette = torch.tensor([D.PALETTE[D.COLORS[c]] for c in other.tolist()], dtype=torch.float32)
    got = painted.permute(0, 2, 3, 1)[interior]
    want = palette[:, None, None, :].expand(-1, 64, 64, -1)[interior]
    assert (got - want).abs().max() < 1.0
    # the relabelled picture reads as the new colour and the same shape
    from PIL import Image

    for i in range(3):
        Image.fromarray(painted[i].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()).save(tmp_path / f"rp{i}.png")
        assert D.pixel_labels(tmp_path / f"rp{i}.png") == (D.COLORS[other[i]], D.SHAPES[y[i, 1]])


def test_normalize_equals_the_image_processor():
    from focusvlm.models.demo import vision as V

    processor = V.tower_image_processor(64)
    raw, _, ids = T.load_split_raw("test", [0, 5])
    px, _, _ = T.load_split_pixels("test", processor, [0, 5])
    assert torch.equal(T.normalize(raw, processor), px)
