"""Token-map pictures: panel logic on hand-made records, and `focusvlm show` end to end."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from focusvlm import viz
from focusvlm.cli import show
from focusvlm.compress.divprune_method import divprune_panel
from focusvlm.compress.prumerge_method import prumerge_panel
from focusvlm.compress.spd_method import window_panel
from focusvlm.compress.visionzip_method import visionzip_panel
from focusvlm.compress.vmtc import StageRecord
from focusvlm.compress.vmtc_method import stage_panels
from focusvlm.models.factory import demo_image_path, random_llava
from test_vmtc_model import tiny_processor


def test_vmtc_panels_follow_patches_through_stages():
    # stage 1: 4 patches, keep 1 and 3, merge 0 and 2 into cluster 0 -> tokens [p1, p3, c0]
    r1 = StageRecord(torch.zeros(1, 4), torch.tensor([[1, 3]]), torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    # stage 2: keep token 2 (the cluster), drop tokens 0 and 1
    r2 = StageRecord(torch.zeros(1, 3), torch.tensor([[2]]), torch.tensor([[0, 1]]), torch.zeros(1, 0, dtype=torch.long))
    p1, p2 = stage_panels([r1, r2], [3, 7])
    assert p1.state.tolist() == [viz.MERGED, viz.PRIMARY, viz.MERGED, viz.PRIMARY]
    assert p1.group.tolist() == [0, -1, 0, -1]
    assert p2.state.tolist() == [viz.PRIMARY, viz.DROPPED, viz.PRIMARY, viz.DROPPED]
    assert p1.title == "layer 3: 4 -> 3" and p2.title == "layer 7: 3 -> 1"


def test_spd_and_prumerge_panels():
    p = window_panel((4, 4), 2)
    assert p.group.reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    rec = {"kept": torch.tensor([[0, 5]]), "neighbours": torch.tensor([[[1, 2], [2, 6]]])}
    q = prumerge_panel(rec, 8)
    # patches no kept token absorbs flow into the extra (merged) token, group 2
    assert q.state.tolist() == [1, 2, 2, 2, 2, 1, 2, 2]
    # patch 2 is kept 1's nearest neighbour but only kept 0's second: the nearer claim wins
    assert q.group.tolist() == [0, 0, 1, 2, 2, 1, 1, 2]
    assert q.title == "PruMerge: 8 -> 3"
    # official fixed PruMerge+ duplicates: the pruned position the complement skips reaches no token
    rec["pruned"] = torch.tensor([[4, 7]])
    assert prumerge_panel(rec, 8).state.tolist() == [1, 2, 2, 0, 2, 1, 2, 2]


def test_visionzip_and_divprune_panels():
    from focusvlm.compress.divprune import DivPruneRecord
    from focusvlm.compress.visionzip import VisionZipRecord

    # positions count CLS as 0: dominant CLS + patch 2 (position 3); contextual targets 1 and 5 (positions 2, 6)
    rec = VisionZipRecord(torch.tensor([[0, 3]]), torch.tensor([[2, 6]]), torch.tensor([[1, 4, 5]]),
                          torch.tensor([[1, 0, 1]]))
    p = visionzip_panel(rec, 6)
    assert p.state.tolist() == [viz.MERGED, viz.MERGED, viz.PRIMARY, viz.MERGED, viz.MERGED, viz.MERGED]
    assert p.group.tolist() == [1, 0, -1, 0, 1, 1]
    d = divprune_panel(DivPruneRecord(torch.tensor([[4, 1]]), torch.tensor([[1, 4]])), 6)
    assert d.state.tolist() == [viz.DROPPED, viz.PRIMARY, viz.DROPPED, viz.DROPPED, viz.PRIMARY, viz.DROPPED]
    # with CLS among the projected tokens (LLaVA's 'full' strategy) position 0 is no patch
    d = divprune_panel(DivPruneRecord(torch.tensor([[0, 3]]), torch.tensor([[0, 3]])), 6, offset=1)
    assert d.state.tolist() == [viz.DROPPED, viz.DROPPED, viz.PRIMARY, viz.DROPPED, viz.DROPPED, viz.DROPPED]


def test_render_marks_dropped_and_kept():
    img = Image.fromarray(np.full((28, 28, 3), 200, dtype=np.uint8))
    panel = viz.Panel("t", np.array([viz.PRIMARY, viz.DROPPED, viz.MERGED, viz.MERGED]), np.array([-1, -1, 0, 0]))
    out = np.asarray(viz.render(img, (2, 2), [panel], "4 -> 3"))
    tile = out[22:50, 8:36]
    assert tile[3, 21].max() < 80           # the dropped cell (top right) is darkened
    assert (tile[0, 0] == 255).all()        # the primary cell (top left) has a white outline
    assert (tile[3, 3] == 200).all()        # ... and is otherwise untouched
    assert (tile[20, 3] == tile[20, 17]).all() and not (tile[20, 3] == 200).all()  # one cluster, one tint


def _parser():
    ap = argparse.ArgumentParser()
    show.register(ap.add_subparsers(dest="command"))
    return ap


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    random_llava("tiny").save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method,tokens", [("vmtc", 16), ("spd", 16), ("prumerge:0.25", 17), ("prumerge:16", 16),
                                           ("visionzip:16", 16), ("divprune:16", 16)])
def test_show_cli_on_tiny_model(tiny_folder, tmp_path, capsys, method, tokens):
    out = tmp_path / "map.png"
    argv = ["show", "--image", str(demo_image_path("chelsea")), "--model", str(tiny_folder), "--device", "cpu",
            "--method", method, "-o", str(out)]
    if method == "vmtc":
        argv += ["--target", "0.25", "--stages", "2"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    assert f"({tokens} image tokens)" in capsys.readouterr().out
    pic = Image.open(out)
    assert pic.size[0] > 112 and pic.size[1] > 112


def test_show_cli_errors(tiny_folder, tmp_path):
    args = _parser().parse_args(["show", "--image", str(tmp_path / "none.jpg"), "--model", str(tiny_folder), "-o",
                                 str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="no such file"):
        args.func(args)
    args = _parser().parse_args(["show", "--image", str(demo_image_path()), "--model", str(tiny_folder),
                                 "--method", "spd", "--target", "0.5", "-o", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="VMTC only"):
        args.func(args)
    args = _parser().parse_args(["show", "--image", str(demo_image_path()), "--model", str(tiny_folder),
                                 "--method", "fastv", "-o", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="not a vision-side method"):
        args.func(args)


@pytest.mark.slow
def test_show_on_demo_model(tmp_path, capsys):
    out = tmp_path / "demo.png"
    args = _parser().parse_args(["show", "--image", str(demo_image_path()), "--model", "demo-random", "--device", "cpu",
                                 "-o", str(out)])
    assert args.func(args) == 0
    assert "(288 image tokens)" in capsys.readouterr().out
    assert Image.open(out).size[0] > 4 * 336
