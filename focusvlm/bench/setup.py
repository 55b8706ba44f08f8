"""What a benchmark sets up before it measures: options, the model, its inputs, each arm applied and probed.

Shared by the in-process harness (``focusvlm.bench.harness``) and the one-arm
memory process (``focusvlm.bench.memproc``); nothing here times anything.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..api import ProcessorHint, unpatch
from ..api import patch as _patch
from .arms import BenchArm, parse_arm

# text tokens before the image placeholders, as in LLaVA-1.5's "USER: <image>\n..." prompts
PROMPT_PREFIX = 5
# a vision-only run keeps the preset's tower and projector input but hangs a token LM behind it
_TOKEN_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)


@dataclass
class BenchOptions:
    preset: str | None = "mid"
    model: str | None = None
    methods: list[BenchArm] = field(default_factory=lambda: [parse_arm("stock"), parse_arm("cmai")])  # --methods
    batches: list[int] = field(default_factory=lambda: [1])
    prompt_tokens: int | list[int] = 64      # one length, or a sweep (every length x every batch size)
    new_tokens: int = 128
    repeats: int = 5
    warmup: int = 1
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    vision_only: bool = False
    threads: int | None = None
    progress: bool = True
    # "round": one model, each arm patched on/off in turn, whole calls interleaved (GPU default).
    # "step": one identical model copy per arm, calls interleaved one by one and decode steps in
    # lockstep, so a load swing on a shared CPU hits every arm in the same second (CPU default).
    interleave: str = "auto"
    # "none": memory as the interleave mode measures it; "process": the prefill's peak memory, each arm in a
    # fresh process of its own (CPU: peak RSS; GPU: max allocated), so no allocator history is shared
    memory: str = "none"
    # the compiled path on every arm: the vision tower and CMAI's per-layer prefill math (timed TTFT), decode steps
    # through torch.compile(model.forward, fullgraph=True) with a static cache
    compile: bool = False
    # with compile: the vision tower compiled with mode "reduce-overhead" (CUDA graphs on a GPU; its shapes are
    # static), on every arm. At batch 1 on a GPU the tower's time is launches: VMTC's stages add ~130 kernels
    tower_graphs: bool = False
    count_ops: bool = False                   # top-level aten ops of one decode step (torch.profiler)
    clock: str = "wall"                       # "cpu": process CPU time, immune to other jobs taking the cores
    profile: int = 0                          # > 0: profile one prefill per arm, keep the top ops by extra time

    def __post_init__(self) -> None:
        lengths = [self.prompt_tokens] if isinstance(self.prompt_tokens, int) else list(self.prompt_tokens)
        if not lengths or any(p < PROMPT_PREFIX + 1 for p in lengths):
            raise ValueError(f"--prompt-tokens must be at least {PROMPT_PREFIX + 1} (text before and after the image)")
        self.prompt_lengths = lengths
        if self.memory not in ("none", "process"):
            raise ValueError(f"--memory must be none or process, got {self.memory!r}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.new_tokens < 0 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("--new-tokens must be >= 0, --repeats >= 1, --warmup >= 0")
        if any(b < 1 for b in self.batches):
            raise ValueError(f"batch sizes must be positive, got {self.batches}")
        if self.tower_graphs and not self.compile:
            raise ValueError("--tower-graphs needs --compile")
        if self.compile and self.warmup < 1:
            raise ValueError("--compile needs --warmup 1 or more: the first calls compile, and would be timed")
        if self.interleave not in ("auto", "round", "step"):
            raise ValueError(f"--interleave must be auto, round or step, got {self.interleave!r}")
        if not any(m.is_stock for m in self.methods):  # every ratio needs the stock reference
            self.methods.insert(0, parse_arm("stock"))


# ----------------------------------------------------------------------------- the model

def build_model(opts: BenchOptions, device: torch.device, dtype: torch.dtype):
    """The model under test: a checkpoint (``--model``) or a random-weight preset of its family's adapter."""
    if opts.model:
        from ..runtime import load_model

        model, _ = load_model(opts.model, device, dtype)
    else:
        from ..models import adapter_for_preset

        adapter = adapter_for_preset(opts.preset)
        overrides = _TOKEN_LM if opts.vision_only else {}
        # build in place on the target device and dtype: a 7B/13B preset made in fp32 on the host first
        # would need 28/52 GB of RAM and minutes of copying
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = adapter.random_model(opts.preset, seed=opts.seed, dtype=dtype, attn_implementation="sdpa",
                                             **overrides)
        finally:
            torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model.to(device).eval()


# ----------------------------------------------------------------------------- an arm on the model

def patch_quietly(model, config):
    """focusvlm.patch without a processor: the bench builds inputs with the reduced count itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProcessorHint)
        return _patch(model, config)


@contextlib.contextmanager
def arm_applied(model, arm: BenchArm) -> Iterator[Any]:
    """The model as ``arm`` wants it, restored to stock on exit."""
    original = model.config._attn_implementation
    if arm.attn_implementation is not None:
        model.set_attn_implementation(arm.attn_implementation)
    handle = None
    try:
        if not arm.config.is_stock:
            handle = patch_quietly(model, arm.config)
        yield handle
    finally:
        if handle is not None:
            unpatch(model)
        if arm.attn_implementation is not None:
            model.set_attn_implementation(original)


def fit_arm(model, arm: BenchArm) -> BenchArm:
    """``arm`` with each method's config fitted to ``model`` (the registry's ``fit_to_model``: VMTC runs no more
    stages than a small tower has encoder layers before its feature layer)."""
    from ..models import adapter_for

    return arm.fit_to_model(model, adapter_for(model))


def vision_call(model, vision: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """The vision path alone (tower + projector) on ``vision``, as a call."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    return lambda: adapter.image_features(model, **vision)


def probe_vision(model, arm: BenchArm, vision: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Visual token count (first image), per-layer token schedule and compressing stages (tokens in, kept,
    clusters, k-means iterations) of the patched vision path, run on the whole batch: PruMerge's adaptive count
    is taken over the batch."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    # a merger tower keeps every patch through its blocks (packed rows, no batch axis): no schedule to record
    layers = [] if adapter.reduces_after_merger else adapter.encoder_layers(model)
    schedule: list[tuple[int, int]] = []
    crops: list[int] = []   # tower batch of one image: its crops

    def record(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, (tuple, list)) else output
        schedule.append((int(hidden.shape[1]), int(out.shape[1])))
        crops.append(int(hidden.shape[0]))

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in layers]
    try:
        with arm_applied(model, arm) as handle, torch.inference_mode():
            # the whole batch: PruMerge's adaptive count is taken over it, and every image gets that count
            every = vision_call(model, vision)()
            feats = every[0]
            stages = _stage_plan(model, adapter, handle.vision if handle is not None else None, vision)
    finally:
        for h in hooks:
            h.remove()
    images = int(vision["pixel_values"].shape[0]) if "pixel_values" in vision and not adapter.reduces_after_merger else 1
    per_sample = [int(f.shape[0]) for f in every] if not adapter.reduces_after_merger else None
    return {"visual_tokens": int(feats.shape[0]), "visual_tokens_per_sample": per_sample,
            "schedule": schedule, "vision_stages": stages,
            "crops": crops[0] // images if crops else 1}


def _stage_plan(model, adapter, method, vision: dict[str, torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """The bound vision method's compressing stages; after a merger tower, those of the first image's frames."""
    if method is None:
        return []
    if not adapter.reduces_after_merger:
        return method.stage_plan()
    merge = adapter.core(model).visual.spatial_merge_size
    return [stage for t, h, w in vision["image_grid_thw"][:1].tolist()
            for stage in method.stage_plan((h // merge) * (w // merge))]


# ----------------------------------------------------------------------------- inputs

def make_input_ids(text_ids: torch.Tensor, visual_tokens: int, image_token_id: int) -> torch.Tensor:
    """LLaVA layout: a few text tokens, the image placeholders, then the rest of the prompt."""
    b = text_ids.shape[0]
    image = torch.full((b, visual_tokens), image_token_id, dtype=text_ids.dtype, device=text_ids.device)
    return torch.cat([text_ids[:, :PROMPT_PREFIX], image, text_ids[:, PROMPT_PREFIX:]], dim=1)


def prompt_inputs(text_ids: torch.Tensor, info: dict[str, Any], image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for the probed vision path ``info``: each sample gets its own image's count
    (methods whose count depends on the image: HiRED, GlobalCom2, DivPrune on AnyRes), shorter samples
    left-padded as a processor pads a batch; all equal: no padding."""
    counts = info.get("visual_tokens_per_sample") or [info["visual_tokens"]] * text_ids.shape[0]
    longest = max(counts)
    ids = make_input_ids(text_ids, longest, image_token_id)
    mask = torch.ones_like(ids)
    for row, count in enumerate(counts):
        if count < longest:   # drop the surplus placeholders, pad on the left
            width = ids.shape[1] - (longest - count)
            keep = torch.cat([ids[row, :PROMPT_PREFIX + count], ids[row, PROMPT_PREFIX + longest:]])
            ids[row] = torch.cat([keep.new_zeros(ids.shape[1] - width), keep])
            mask[row, :ids.shape[1] - width] = 0
    return ids, mask


def bench_inputs(model, batch: int, prompt: int, gen: torch.Generator, device, dtype):
    """(the family's random vision inputs for ``batch`` samples, ``prompt`` random text ids per sample).

    Text ids never hit an image or video token, so only the placeholders added later carry images.
    """
    from ..models import adapter_for

    cfg = model.config
    vision = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
              for k, v in adapter_for(model).random_pixel_inputs(model, batch, gen).items()}
    text_ids = torch.randint(0, cfg.text_config.vocab_size - 2, (batch, prompt), generator=gen)
    specials = [getattr(cfg, k) for k in ("image_token_id", "video_token_id") if getattr(cfg, k, None) is not None]
    return vision, text_ids.masked_fill(torch.isin(text_ids, torch.tensor(specials)), 1).to(device)
