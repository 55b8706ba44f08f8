"""Analytic prefill FLOPs of the real Qwen2.5-VL-7B / Qwen3-VL-8B geometries at 448 px (config only, no weights).

Run: PYTHONPATH=. python benchmarks/qwen_full_geometry_flops.py
"""
from focusvlm.bench.flops import TextShape, merged_vmtc_flops, merger_prefill_flops
from focusvlm.compress.vmtc import stage_schedule
from focusvlm.models import adapter_for_preset

for preset, side in (("qwen2.5-vl-7b", 448), ("qwen3-vl-8b", 448)):
    cfg = adapter_for_preset(preset).config_for(preset)
    vc = cfg.vision_config
    g = side // vc.patch_size
    grids = [[1, g, g]]
    n = (g // 2) ** 2
    stage = stage_schedule(n, 0.5, 1, 0.125)[0]
    t = TextShape.from_config(cfg.text_config)
    stock = merger_prefill_flops(vc, t, grids=grids, prompt_tokens=64, visual_tokens=n)
    vmtc = merger_prefill_flops(vc, t, grids=grids, prompt_tokens=64, visual_tokens=stage.n_out,
                                vmtc=merged_vmtc_flops(vc, grids, [(stage.n_in, stage.keep, stage.clusters, 10)]))
    print(f"{preset} {side}px: {n} -> {stage.n_out} image tokens; prefill TFLOPs stock {stock.total/1e12:.2f} "
          f"(vision {stock.vision/1e12:.2f}, llm {stock.llm/1e12:.2f}); vmtc 0.5 {vmtc.total/1e12:.2f} "
          f"(vision {vmtc.vision/1e12:.2f}, llm {vmtc.llm/1e12:.2f}) = {vmtc.total/stock.total:.2f}x")
