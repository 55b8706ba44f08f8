"""CLIP-style pretraining of the demo's vision tower on easy-VQA, so it plays the role CLIP plays in LLaVA.

The tower (``models.demo.vision.TOWER``: CLIP architecture, 64x64 input, 8-pixel patches, CLS kept)
is trained from scratch with a contrastive image-text objective against a tiny CLIP text encoder
over a word vocabulary. Captions are built from each training image's (colour, shape) as its
questions state them (``data.image_labels``): full captions ("A red circle on a plain
background."), colour-only ("A red shape.") and shape-only ("A circle."), so the text side can
ask for one attribute at a time.

easy-VQA has only 24 (colour, shape) pairs, so a batch holds many images a caption is true of.
Plain CLIP would push those apart as negatives; ``soft_clip_loss`` instead spreads each row's
target over every image (caption) the caption (image) matches. With one match per row it is
exactly CLIP's loss (tested).

Checks, on the 1,000 test images:
* zero-shot caption retrieval: colour (8 prompts), shape (3), both (24), from the pooled CLS;
* a linear probe on the features LLaVA actually reads (encoder layer -2, the 64 patch tokens
  mean- and max-pooled), trained on the train images.
Only the vision tower and its image processor are saved (``models.demo.vision.save_tower``).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..models.demo import vision as V
from . import data as D

PAD, EOS = "<pad>", "<eos>"
COLOR_ONLY = "A {color} shape."
SHAPE_ONLY = "A {shape}."
JOINT = "A {color} {shape}."


@dataclass
class TowerRecipe:
    """Contrastive pretraining settings (defaults: 1,260 steps, zero-shot test accuracy 100 % colour and 99.6 %
    shape, 474 s on the shared 2-core CPU; benchmarks/demo/tower_pretrain.log)."""
    epochs: int = 20             # shape is learned late: ~40 % until epoch 4, 92 % at 8, 99 % from 11 on
    batch_size: int = 64         # more, smaller steps: the ViT's shape features need steps, not samples
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    flip: bool = True            # horizontal flips keep easy-VQA's labels (its triangles point up)
    repaint: float = 0.5         # share of training images whose shape is repainted in another palette colour
    shift: int = 0               # random translation up to this many pixels (edge pixels repeated: the
                                 # background is uniform); off: with it shape was learned more slowly
    full_caption_share: float = 0.5  # captions naming colour and shape
    shape_caption_share: float = 0.35  # "A circle.": colour is learned within an epoch, shape takes hundreds of
                                       # steps, so the rest (colour-only captions) is the smaller share
    seed: int = 0
    train_images: int | None = None  # None = all 4,000
    test_images: int | None = None   # None = all 1,000 (fewer only for quick checks)
    probe_steps: int = 300
    tower: dict[str, Any] = field(default_factory=dict)  # overrides of models.demo.vision.TOWER
    threads: int | None = None  # torch threads; 1 is faster than 2 when other jobs share the two cores


@dataclass
class TowerReport:
    seconds: float
    cpu_seconds: float           # this process's CPU time: what the run costs on an otherwise idle machine
    seconds_per_epoch: float
    tower_parameters: int
    tower_bytes_fp32: int
    steps: int
    loss_first: float
    loss_last: float
    zero_shot: dict[str, float]
    probe_layer_minus_2: dict[str, float]
    recipe: dict[str, Any] = field(default_factory=dict)
    threads: int = 0


# --------------------------------------------------------------------------- text side

class WordVocab:
    """Lowercase words of every caption form, plus <pad> (0) and <eos> (1)."""

    def __init__(self) -> None:
        words = set()
        for text in D.CAPTION_TEMPLATES + (COLOR_ONLY, SHAPE_ONLY, JOINT):
            for c in D.COLORS:
                for s in D.SHAPES:
                    words.update(self.split(text.format(color=c, shape=s)))
        self.words = [PAD, EOS] + sorted(words)
        self.ids = {w: i for i, w in enumerate(self.words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    @property
    def max_words(self) -> int:
        return 16

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), right-padded; every row ends with <eos> (where CLIP's text model pools)."""
        rows = []
        for t in texts:
            words = self.split(t)
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(f"caption {t!r} has words outside the tower vocabulary: {unknown}")
            rows.append([self.ids[w] for w in words] + [self.ids[EOS]])
        width = max(len(r) for r in rows)
        if width > self.max_words:
            raise ValueError(f"a caption has {width} tokens; the text encoder takes {self.max_words}")
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids, mask


def draw_caption(color: int, shape: int, rng: random.Random, full_share: float,
                 shape_share: float | None = None) -> tuple[str, int, int]:
    """(caption, colour index or -1, shape index or -1): -1 where the caption leaves that attribute open.

    ``full_share`` of captions name both, ``shape_share`` only the shape (default: half the rest), the rest
    only the colour."""
    c, s = D.COLORS[color], D.SHAPES[shape]
    shape_share = (1 - full_share) / 2 if shape_share is None else shape_share
    u = rng.random()
    if u < full_share:
        return rng.choice(D.CAPTION_TEMPLATES).format(color=c, shape=s), color, shape
    if u < full_share + shape_share:
        return SHAPE_ONLY.format(shape=s), -1, shape
    return COLOR_ONLY.format(color=c), color, -1


def caption_matches(image_labels: torch.Tensor, caption_attrs: torch.Tensor) -> torch.Tensor:
    """(B_img, B_cap) bool: caption j is true of image i (each attribute equal, or open = -1).

    image_labels (B_img, 2) and caption_attrs (B_cap, 2) hold (colour, shape) indices.
    """
    color_ok = (caption_attrs[None, :, 0] == -1) | (caption_attrs[None, :, 0] == image_labels[:, None, 0])
    shape_ok = (caption_attrs[None, :, 1] == -1) | (caption_attrs[None, :, 1] == image_labels[:, None, 1])
    return color_ok & shape_ok


def soft_clip_loss(logits_per_image: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with each row's target spread evenly over its true matches.

    logits_per_image (B, B): scaled cosine similarities, image i vs caption j; matches (B, B) bool
    with at least one True per row and column (each caption is drawn from its own image). With
    matches = identity this is CLIP's loss: (CE(logits, arange) + CE(logits.T, arange)) / 2.
    """
    m = matches.to(logits_per_image.dtype)
    image_to_text = -(m / m.sum(1, keepdim=True) * F.log_softmax(logits_per_image, dim=1)).sum(1).mean()
    text_to_image = -(m.T / m.T.sum(1, keepdim=True) * F.log_softmax(logits_per_image.T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


# --------------------------------------------------------------------------- images

def load_split_pixels(split: str, image_processor, image_ids: list[int] | None = None,
                      chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(pixel_values (N, 3, H, W) through the tower's image processor, labels (N, 2) colour/shape indices,
    image ids) of a split's images (all, or ``image_ids``), ordered by id."""
    raw, y, ids = load_split_raw(split, image_ids)
    pictures = raw.to(torch.uint8)  # exact: the PNGs are 8-bit
    pixels = [image_processor(images=list(pictures[k:k + chunk]), return_tensors="pt")["pixel_values"]
              for k in range(0, len(pictures), chunk)]
    return torch.cat(pixels), y, ids


def paint_layers(images: torch.Tensor, colors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(background (N, 3), coverage alpha (N, H, W) in [0, 1]) of easy-VQA pictures (N, 3, H, W), 0-255.

    The generator paints one palette colour over a uniform background and downsamples, so every pixel
    is background + alpha * (colour - background); alpha is the pixel's projection on that line.
    """
    N = images.shape[0]
    rgb = images.reshape(N, 3, -1).long()
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]  # (N, H*W) one integer per colour
    # the most frequent colour is the background (the shape covers at most a quarter of the picture)
    mode = packed.mode(dim=1).values
    bg = torch.stack([mode >> 16, (mode >> 8) & 255, mode & 255], dim=1).float()
    palette = torch.tensor([D.PALETTE[c] for c in D.COLORS], dtype=torch.float32)
    line = palette[colors] - bg  # (N, 3)
    alpha = ((images.float() - bg[:, :, None, None]) * line[:, :, None, None]).sum(1) / line.pow(2).sum(1)[:, None, None]
    return bg, alpha.clamp(0, 1)


def repaint(bg: torch.Tensor, alpha: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """Pictures (N, 3, H, W), 0-255, with each shape painted in palette colour ``colors[i]``."""
    palette = torch.tensor([D.PALETTE[c] for c in D.COLORS], dtype=torch.float32)
    return bg[:, :, None, None] + alpha[:, None] * (palette[colors] - bg)[:, :, None, None]


def normalize(images: torch.Tensor, image_processor) -> torch.Tensor:
    """0-255 pictures -> the tower's pixel_values, exactly as the CLIP image processor does for 64x64 inputs
    (its resize and crop are identities there; tested)."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
    return (images / 255.0 - mean) / std


def random_shift(pixels: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image translated by its own (dy, dx) in [-max_shift, max_shift], border pixels repeated."""
    B, _, H, W = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(offsets)])


def load_split_raw(split: str, image_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(pictures (N, 3, 64, 64) as 0-255 floats, labels (N, 2), image ids) of a split, ordered by id."""
    import numpy as np
    from PIL import Image

    items = D.read_split(split)
    if image_ids is not None:
        wanted = set(image_ids)
        items = [it for it in items if it.image_id in wanted]
    labels = D.image_labels(items)
    ids = sorted(labels) if image_ids is None else sorted(image_ids)
    root = D.data_root()
    arrays = []
    for i in ids:
        with Image.open(root / split / "images" / f"{i}.png") as im:
            arrays.append(np.asarray(im.convert("RGB")))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    y = torch.tensor([[D.COLORS.index(labels[i][0]), D.SHAPES.index(labels[i][1])] for i in ids])
    return images, y, ids


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def zero_shot(clip, vocab: WordVocab, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> dict[str, float]:
    """Caption-retrieval accuracy: colour among 8 "A {c} shape.", shape among 3 "A {s}.", both among 24."""
    clip.eval()
    images = torch.cat([F.normalize(_pooled(clip.get_image_features(pixel_values=pixels[k:k + batch])), dim=-1)
                        for k in range(0, len(pixels), batch)])

    def texts(prompts: list[str]) -> torch.Tensor:
        ids, mask = vocab.encode(prompts)
        return F.normalize(_pooled(clip.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)

    colors = (images @ texts([COLOR_ONLY.format(color=c) for c in D.COLORS]).T).argmax(1)
    shapes = (images @ texts([SHAPE_ONLY.format(shape=s) for s in D.SHAPES]).T).argmax(1)
    pairs = [(c, s) for c in range(len(D.COLORS)) for s in range(len(D.SHAPES))]
    joint = (images @ texts([JOINT.format(color=D.COLORS[c], shape=D.SHAPES[s]) for c, s in pairs]).T).argmax(1)
    joint_pairs = torch.tensor(pairs)[joint]
    return {"color": float((colors == labels[:, 0]).float().mean()),
            "shape": float((shapes == labels[:, 1]).float().mean()),
            "color+shape": float((joint_pairs == labels).all(1).float().mean())}


def _pooled(out: Any) -> torch.Tensor:
    """get_image/text_features return the projected embedding (transformers 5 wraps it in an output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def llava_features(vision_model, pixels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(N, 2 * hidden): the patch tokens of encoder layer -2 (what LLaVA's projector reads), mean and max."""
    vision_model.eval()
    out = []
    for k in range(0, len(pixels), batch):
        hidden = vision_model(pixel_values=pixels[k:k + batch], output_hidden_states=True).hidden_states[-2][:, 1:]
        out.append(torch.cat([hidden.mean(1), hidden.amax(1)], dim=-1))
    return torch.cat(out)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Test accuracy of a linear classifier per attribute (colour, shape), full-batch Adam on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    out = {}
    for col, (name, vocab) in enumerate((("color", D.COLORS), ("shape", D.SHAPES))):
        torch.manual_seed(seed)
        head = torch.nn.Linear(train_x.shape[1], len(vocab))
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(train_x), train_y[:, col]).backward()
            opt.step()
        with torch.no_grad():
            out[name] = float((head(test_x).argmax(1) == test_y[:, col]).float().mean())
    return out


# --------------------------------------------------------------------------- training

def _lr_at(step: int, total: int, recipe: TowerRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_tower(out_dir: str | Path, recipe: TowerRecipe | None = None,
                   log: Callable[[str], None] = print) -> TowerReport:
    """Train the tower contrastively, evaluate it, save it (+ ``tower_report.json``) into ``out_dir``."""
    recipe = recipe or TowerRecipe()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    start, cpu_start = time.time(), time.process_time()
    vision_config = V.tower_config(**recipe.tower)
    processor = V.tower_image_processor(vision_config.image_size)
    vocab = WordVocab()
    pictures = _load_pictures(recipe, processor)
    log(f"tower: {len(pictures.train_px)} train / {len(pictures.test_px)} test images loaded in "
        f"{time.time() - start:.1f} s")
    clip = V.contrastive_clip(vision_config, vocab_size=len(vocab.words), eos_token_id=vocab.ids[EOS],
                              pad_token_id=vocab.ids[PAD], max_words=vocab.max_words, seed=recipe.seed)
    losses, train_seconds = _train(clip, vocab, pictures, processor, recipe, log, cpu_start)
    scores = zero_shot(clip, vocab, pictures.test_px, pictures.test_y)
    tower = V.clip_vision_part(clip)
    probe = linear_probe(llava_features(tower, pictures.train_px), pictures.train_y,
                         llava_features(tower, pictures.test_px), pictures.test_y,
                         steps=recipe.probe_steps, seed=recipe.seed)
    out_dir = Path(out_dir)
    V.save_tower(tower, processor, out_dir)
    n_params = sum(p.numel() for p in tower.parameters())
    per_epoch = _steps_per_epoch(pictures, recipe)
    report = TowerReport(seconds=round(time.time() - start, 1), cpu_seconds=round(time.process_time() - cpu_start, 1),
                         seconds_per_epoch=round(train_seconds / recipe.epochs, 1),
                         tower_parameters=n_params, tower_bytes_fp32=4 * n_params, steps=len(losses),
                         loss_first=round(losses[0], 4), loss_last=round(sum(losses[-per_epoch:]) / per_epoch, 4),
                         zero_shot=scores, probe_layer_minus_2=probe, recipe=asdict(recipe),
                         threads=torch.get_num_threads())
    (out_dir / "tower_report.json").write_text(json.dumps(asdict(report), indent=1))
    log(f"tower: zero-shot test accuracy {scores}; layer -2 probe {probe}; saved to {out_dir}")
    return report


@dataclass
class _Pictures:
    """The training pictures as pixel_values, their labels and paint layers (to repaint them); the test pictures."""
    train_px: torch.Tensor
    train_y: torch.Tensor
    train_bg: torch.Tensor
    train_alpha: torch.Tensor
    test_px: torch.Tensor
    test_y: torch.Tensor


def _load_pictures(recipe: TowerRecipe, processor) -> _Pictures:
    train_ids = None
    if recipe.train_images is not None:
        train_ids = sorted({it.image_id for it in D.train_subset(D.read_split("train"), recipe.train_images,
                                                                   recipe.seed)})
    train_raw, train_y, _ = load_split_raw("train", train_ids)
    train_bg, train_alpha = paint_layers(train_raw, train_y[:, 0])
    train_px = normalize(train_raw, processor)
    test_ids = None if recipe.test_images is None else list(range(recipe.test_images))
    test_px, test_y, _ = load_split_pixels("test", processor, test_ids)
    return _Pictures(train_px, train_y, train_bg, train_alpha, test_px, test_y)


def _steps_per_epoch(pictures: _Pictures, recipe: TowerRecipe) -> int:
    return math.ceil(len(pictures.train_px) / recipe.batch_size)


def _train(clip, vocab: WordVocab, pictures: _Pictures, processor, recipe: TowerRecipe, log: Callable[[str], None],
           cpu_start: float) -> tuple[list[float], float]:
    """Contrastive training of ``clip`` in place: (the loss of every step, the seconds it took)."""
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = random.Random(f"{recipe.seed}/captions")
    per_epoch = _steps_per_epoch(pictures, recipe)
    total = per_epoch * recipe.epochs
    losses: list[float] = []
    train_start = time.time()
    for epoch in range(recipe.epochs):
        clip.train()
        order = torch.randperm(len(pictures.train_px), generator=gen)
        for k in range(0, len(order), recipe.batch_size):
            px, y = _augmented_batch(pictures, order[k:k + recipe.batch_size], processor, recipe, gen)
            for group in opt.param_groups:
                group["lr"] = _lr_at(len(losses), total, recipe)
            losses.append(_step(clip, opt, vocab, px, y, rng, recipe))
        quick = zero_shot(clip, vocab, pictures.test_px[:200], pictures.test_y[:200])
        log(f"tower: epoch {epoch + 1}/{recipe.epochs} loss {sum(losses[-per_epoch:]) / per_epoch:.4f} "
            f"zero-shot on 200 test images {', '.join(f'{k} {v:.3f}' for k, v in quick.items())} "
            f"({time.time() - train_start:.0f} s, cpu {time.process_time() - cpu_start:.0f} s)")
    return losses, time.time() - train_start


def _augmented_batch(pictures: _Pictures, idx: torch.Tensor, processor, recipe: TowerRecipe,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, labels) of the training pictures ``idx``, repainted, flipped and shifted as the recipe says."""
    px, y = pictures.train_px[idx], pictures.train_y[idx].clone()
    if recipe.repaint:
        # the same geometry in other colours: shape features must not depend on the colour
        chosen = torch.rand(len(idx), generator=gen) < recipe.repaint
        new = torch.randint(0, len(D.COLORS), (len(idx),), generator=gen)
        y[chosen, 0] = new[chosen]
        painted = normalize(repaint(pictures.train_bg[idx], pictures.train_alpha[idx], y[:, 0]), processor)
        px = torch.where(chosen[:, None, None, None], painted, px)
    if recipe.flip:
        flip = torch.rand(len(idx), generator=gen) < 0.5
        px = torch.where(flip[:, None, None, None], px.flip(-1), px)
    if recipe.shift:
        px = random_shift(px, recipe.shift, gen)
    return px, y


def _step(clip, opt, vocab: WordVocab, px: torch.Tensor, y: torch.Tensor, rng: random.Random,
          recipe: TowerRecipe) -> float:
    """One optimizer step on a batch, each picture with a caption drawn for it; returns the loss."""
    drawn = [draw_caption(int(c), int(s), rng, recipe.full_caption_share, recipe.shape_caption_share)
             for c, s in y.tolist()]
    ids, mask = vocab.encode([d[0] for d in drawn])
    attrs = torch.tensor([[d[1], d[2]] for d in drawn])
    out = clip(input_ids=ids, attention_mask=mask, pixel_values=px)
    loss = soft_clip_loss(out.logits_per_image, caption_matches(y, attrs))
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        clip.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
    return loss.item()
