"""The lmms-eval plugin: registered through the entry point, answering a generation request.
Skipped where lmms-eval is not installed (it is an optional extra)."""

import importlib

import pytest


def test_module_imports_without_lmms_eval():
    mod = importlib.import_module("focusvlm.integrations.lmms")
    assert mod.CLASS_PATH == "focusvlm.integrations.lmms.FocusVLMLmms" and mod.MODEL_ID == "focusvlm"


def test_manifest_and_registry():
    pytest.importorskip("lmms_eval")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from focusvlm.integrations.lmms import manifest

    m = manifest()
    assert m.model_id == "focusvlm" and m.simple_class_path.endswith("FocusVLMLmms")
    reg = ModelRegistryV2()
    reg.register_manifest(m)
    assert reg.get_manifest("focusvlm").simple_class_path == m.simple_class_path
    # installed with the extra, the entry point puts it in lmms-eval's own registry
    from importlib.metadata import entry_points

    if any(ep.name == "focusvlm" for ep in entry_points(group="lmms_eval.models")):
        from lmms_eval.models import MODEL_REGISTRY_V2

        assert "focusvlm" in MODEL_REGISTRY_V2.list_canonical_model_ids()


@pytest.mark.slow
def test_generate_until_on_demo(demo):
    pytest.importorskip("lmms_eval")
    from PIL import Image

    from focusvlm.integrations.lmms import FocusVLMLmms
    from focusvlm.models.factory import demo_image_path

    model = FocusVLMLmms(pretrained="demo-random", device="cpu", max_new_tokens=3)
    image = Image.open(demo_image_path("chelsea"))
    model.task_dict = {"t": {"test": {0: {"image": image}}}}

    class Req:
        args = ("What animal is this?", {"max_new_tokens": 3}, lambda doc: [doc["image"]], 0, "t", "test")

    out = model.generate_until([Req()])
    assert len(out) == 1 and isinstance(out[0], str)


def test_compile_model_arg_switches_the_compiled_path(monkeypatch):
    """model_args compile=True (a string, as lmms-eval passes it) compiles the loaded model; a bad value is named."""
    import focusvlm.compiling as compiling
    from focusvlm.integrations.lmms import MODEL_ARGS, load_focus_model

    calls = []
    monkeypatch.setattr(compiling, "compile_model", lambda model, **kw: calls.append(model) or model)
    _, _, model, _ = load_focus_model("demo-random", None, "cpu", None, compile="True")
    assert calls == [model] and "compile" in MODEL_ARGS
    load_focus_model("demo-random", None, "cpu", None, compile="false")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="compile must be true or false"):
        load_focus_model("demo-random", None, "cpu", None, compile="maybe")
