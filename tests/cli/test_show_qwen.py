"""`focusvlm show` on Qwen2.5-VL / Qwen3-VL: VMTC runs once after the 2x2 merger on a variable grid, so the
picture is drawn on the merged-token grid of the image's own size (image_grid_thw), and what it marks
must be what the model hands the LLM."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from focusvlm import viz
from focusvlm.compress.vmtc_method import merged_panel
from focusvlm.cli import show
from focusvlm.compress.vmtc_merged import MergedRecord
from qwen_builders import IMAGE, random_images, tiny_processor
from saved_checkpoints import save_checkpoint

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
SIZES = [(60, 100), (120, 50)]  # two aspect ratios: two different grids


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    family = request.param
    return family, save_checkpoint(family, tmp_path_factory.mktemp(family))


def _parser():
    ap = argparse.ArgumentParser()
    show.register(ap.add_subparsers(dest="command"))
    return ap


def _record_renders(monkeypatch):
    """Every viz.render call of the run: (picture the model saw, grid, panels, footer)."""
    calls = []
    render = viz.render

    def spy(image, grid, panels, footer, cell=0):
        calls.append((image, grid, panels, footer))
        return render(image, grid, panels, footer, cell)

    monkeypatch.setattr(viz, "render", spy)
    return calls


def _llm_image_tokens(folder, family, image, vmtc):
    """Image tokens the patched model hands its LLM for ``image`` in a chat prompt: the patched processor's
    placeholders, checked by one full forward (the model refuses a placeholder / feature mismatch)."""
    from focusvlm import FocusConfig, patched
    from focusvlm.runtime import load_model, to_messages

    model, processor = load_model(str(folder), "cpu")
    with patched(model, FocusConfig(vmtc=vmtc), processor=processor) as handle:
        text = processor.apply_chat_template(to_messages("w3", 1), add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()
        _, h, w = inputs["image_grid_thw"][0].tolist()
        return int((inputs["input_ids"] == IMAGE).sum()), handle.vision.merged_stage_for(h * w // 4)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("prune_only", [False, True], ids=["merge", "prune"])
def test_show_marks_what_the_llm_receives(saved, size, prune_only, tmp_path, monkeypatch, capsys):
    from focusvlm import VMTCConfig

    family, folder = saved
    image_path = tmp_path / "image.png"
    image = Image.fromarray(random_images([size], seed=sum(size))[0])
    image.save(image_path)
    vmtc = VMTCConfig(target=0.5, prune_only=prune_only)
    config = tmp_path / "focus.json"
    config.write_text(json.dumps({"vmtc": {"target": 0.5, "prune_only": prune_only}}))
    calls = _record_renders(monkeypatch)
    out = tmp_path / "map.png"
    args = _parser().parse_args(["show", "--image", str(image_path), "--model", str(folder), "--device", "cpu",
                                 "--config", str(config), "-o", str(out)])
    assert args.func(args) == 0

    # the grid is the image's own: what the processor makes of this size, one cell per merged token
    _, h, w = tiny_processor(family).image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    (seen, grid, panels, footer), = calls
    assert grid == (h // 2, w // 2)
    assert seen.size == (w * PATCH[family], h * PATCH[family])
    picture = Image.open(out)
    assert picture.size[0] == seen.size[0] + 16 and picture.size[1] > seen.size[1]

    # what the panel marks = the method's recorded selection = what the LLM receives
    tokens, stage = _llm_image_tokens(folder, family, image, vmtc)
    (panel,) = panels
    kept = int((panel.state == viz.PRIMARY).sum())
    merged_cells = panel.state == viz.MERGED
    clusters = len(np.unique(panel.group[merged_cells]))
    dropped = int((panel.state == viz.DROPPED).sum())
    assert panel.state.shape == (h * w // 4,)
    assert kept == stage.keep and clusters == stage.clusters
    assert kept + clusters == tokens < h * w // 4
    assert kept + int(merged_cells.sum()) + dropped == h * w // 4
    assert (dropped == h * w // 4 - kept) if prune_only else (dropped == 0 and clusters >= 1)
    assert f"{h * w} patches -> {h * w // 4} merged tokens -> {tokens} image tokens to the LLM" in footer
    assert f"({tokens} image tokens)" in capsys.readouterr().out


def test_show_target_one_draws_the_stock_grid(saved, tmp_path, monkeypatch):
    family, folder = saved
    image_path = tmp_path / "image.png"
    Image.fromarray(random_images([SIZES[0]])[0]).save(image_path)
    calls = _record_renders(monkeypatch)
    args = _parser().parse_args(["show", "--image", str(image_path), "--model", str(folder), "--device", "cpu",
                                 "--method", "vmtc", "--target", "1.0", "-o", str(tmp_path / "map.png")])
    assert args.func(args) == 0
    (_, grid, (panel,), footer), = calls
    n = grid[0] * grid[1]
    assert panel.title == "stock" and (panel.state == viz.PRIMARY).all()
    assert f"-> {n} merged tokens -> {n} image tokens to the LLM" in footer


def test_in_tower_methods_are_refused_with_the_reason(saved, tmp_path):
    from focusvlm.models import UnsupportedModelError

    family, folder = saved
    image_path = tmp_path / "image.png"
    Image.fromarray(random_images([SIZES[0]])[0]).save(image_path)
    args = _parser().parse_args(["show", "--image", str(image_path), "--model", str(folder), "--device", "cpu",
                                 "--method", "spd", "-o", str(tmp_path / "map.png")])
    with pytest.raises(UnsupportedModelError, match="no fixed grid"):
        args.func(args)


@pytest.mark.parametrize("family", FAMILIES)
def test_patches_back_to_the_picture(family):
    """The adapter's inverse of the processor's patch layout gives back the image (not resized, so only
    normalisation rounding separates them)."""
    from focusvlm.models import adapter_for

    from saved_checkpoints import tiny_family_model

    model = tiny_family_model(family)
    p = PATCH[family]
    image = random_images([(4 * p, 6 * p)], seed=3)[0]   # 4 x 6 patches, a multiple of the 2x2 merge
    ip = tiny_processor(family).image_processor
    processed = ip(images=[Image.fromarray(image)], return_tensors="pt", do_resize=False)
    assert processed["image_grid_thw"].tolist() == [[1, 4, 6]]
    inputs, (crop,) = adapter_for(model).shown_crops(model, processed)
    assert set(inputs) == {"pixel_values", "image_grid_thw"}
    assert crop.grid == (2, 3) and crop.patches == 24 and crop.merged == 6 and crop.label == ""
    back = np.asarray(viz.denormalize(crop.pixels, ip.image_mean, ip.image_std)).astype(int)
    assert back.shape == image.shape and np.abs(back - image).max() <= 1


def test_merged_panel_marks_kept_merged_and_dropped():
    # 6 merged tokens: keep 1 and 4; 0, 2 -> cluster 1, 3, 5 -> cluster 0
    rec = MergedRecord(torch.zeros(1, 6), torch.tensor([[1, 4]]), torch.tensor([[0, 2, 3, 5]]),
                       torch.tensor([[1, 1, 0, 0]]), torch.tensor([[0, 1, 3, 4]]))
    p = merged_panel(rec)
    assert p.state.tolist() == [viz.MERGED, viz.PRIMARY, viz.MERGED, viz.MERGED, viz.PRIMARY, viz.MERGED]
    assert p.group.tolist() == [1, -1, 1, 0, -1, 0]
    assert p.title == "after the merger: 6 -> 4"
    pruned = MergedRecord(torch.zeros(1, 6), torch.tensor([[1, 4]]), torch.tensor([[0, 2, 3, 5]]),
                          torch.zeros(1, 0, dtype=torch.long), torch.tensor([[1, 4]]))
    assert merged_panel(pruned).state.tolist() == [viz.DROPPED, viz.PRIMARY, viz.DROPPED, viz.DROPPED,
                                                       viz.PRIMARY, viz.DROPPED]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_two_sizes_give_two_grids(family):
    """The picture tests above run on images whose grids differ, so a fixed grid would fail one of them."""
    ip = tiny_processor(family).image_processor
    grids = [tuple(ip(images=[Image.fromarray(im)], return_tensors="pt")["image_grid_thw"][0].tolist())
             for im in random_images(SIZES)]
    assert grids[0] != grids[1] and grids[0][1] < grids[0][2] and grids[1][1] > grids[1][2]
