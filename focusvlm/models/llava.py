"""LLaVA-1.5 adapter (``LlavaForConditionalGeneration`` / ``LlavaModel``, CLIP tower).

Hook points (transformers 5.23):
* image positions: ``input_ids == image_token_id`` in a call that carries
  ``pixel_values`` (or the <image> embedding in ``inputs_embeds``);
* in-tower stages: the chosen ``CLIPEncoderLayer`` instances get their
  ``__class__`` swapped to a subclass (still a ``CLIPEncoderLayer``, which
  hidden-state capture matches on) that runs the stage between the attention
  residual and the MLP; q/k come from the layer's own projections because
  SDPA returns no attention weights;
* projector input: an instance-level ``forward`` on ``multi_modal_projector``;
* processor: instance-level ``replace_image_token`` and
  ``_get_num_multimodal_tokens`` emit the reduced placeholder count, which
  ``LlavaModel.get_placeholder_mask`` checks against the features.
Every hook returns its undo; the stock classes are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import LlavaForConditionalGeneration, LlavaModel

from .base import CallInputs, FamilyAdapter, TowerGeometry, TowerStage, UnsupportedModelError, override_on_instance
from .. import hfcompat
from . import register_family

CLIPEncoderLayer = hfcompat.encoder_layer_class("clip")


class StagedEncoderForward:
    """The forward of a pre-norm ViT encoder layer (CLIP's, SigLIP's: same sub-modules) with the layer's in-tower
    stage run between attention and MLP. Mixed into a stock layer class: the staged classes below."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        residual = hidden_states
        normed = self.layer_norm1(hidden_states)
        attn_out, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, **kwargs)
        hidden_states = residual + attn_out
        hidden_states = self._focusvlm_stage(self, normed, hidden_states)
        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class StagedCLIPEncoderLayer(StagedEncoderForward, CLIPEncoderLayer):
    """A CLIP encoder layer that runs one in-tower stage between attention and MLP.

    Never constructed: stock layers have their ``__class__`` swapped to it and
    carry their stage in ``_focusvlm_stage`` by ``add_tower_stage``, for any method that works inside the tower.
    """


def _vision_model(core: LlavaModel):
    tower = core.vision_tower
    # transformers 5 flattened CLIPVisionModel; older layouts nest it under .vision_model
    vision_model = getattr(tower, "vision_model", tower)
    if not hasattr(getattr(vision_model, "encoder", None), "layers") or not hasattr(vision_model, "embeddings"):
        raise UnsupportedModelError(f"the vision tower {type(tower).__name__} is not a CLIP-style "
                                    "vision model (needs .encoder.layers and .embeddings)")
    return vision_model


def _wrap_projector(core: LlavaModel, fn: Callable[[Callable, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """Route the projector's forward through ``fn(stock_forward, features)``; returns the exact undo."""
    projector = core.multi_modal_projector
    saved = projector.__dict__.get("forward")
    stock_forward = projector.forward

    def forward(features: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return fn(lambda x: stock_forward(x, *args, **kwargs), features)

    projector.forward = forward

    def undo() -> None:
        if saved is None:
            projector.__dict__.pop("forward", None)
        else:
            projector.forward = saved
    return undo


# --------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preset:
    vision: dict[str, Any]
    text: dict[str, Any]


_CLIP_L_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                   num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
_VICUNA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                   num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)

_MID_TOWER = dict(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, projection_dim=256)

PRESETS: dict[str, Preset] = {
    # unit tests: 64 patches, GQA in the LM, a few layers
    "tiny": Preset(
        vision=dict(image_size=112, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, projection_dim=32),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
    ),
    # CPU benchmarks: LLaVA-1.5 image geometry (576 patches), a small LM
    "mid": Preset(
        vision=_MID_TOWER,
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096),
    ),
    # CPU benchmarks at a 7B model's layer width: two Vicuna-7B decoder layers behind mid's tower. Per-layer
    # costs (CMAI's text-row attention against the projections and MLP) in their real proportion, in 5 GB
    "llava-1.5-7b-2layers": Preset(vision=_MID_TOWER, text={**_VICUNA_7B, "num_hidden_layers": 2}),
    "llava-1.5-7b": Preset(vision=_CLIP_L_336, text=_VICUNA_7B),
    "llava-1.5-13b": Preset(vision=_CLIP_L_336, text=_VICUNA_13B),
}


def llava_config(preset: str = "tiny", image_token_id: int | None = None, **text_overrides: Any):
    """The LlavaConfig of a preset (LLaVA-1.5 wiring: feature layer -2, CLS dropped)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    text = LlamaConfig(**{**p.text, **text_overrides})
    vision = CLIPVisionConfig(**p.vision)
    token_id = image_token_id if image_token_id is not None else text.vocab_size - 1
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")


def random_llava(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "sdpa", **text_overrides: Any):
    """A LLaVA model of the preset's shape with seeded random weights, in eval mode."""
    config = llava_config(preset, **text_overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype)
    return model.eval()


# --------------------------------------------------------------------------- the adapter

@register_family
class LlavaAdapter(FamilyAdapter):
    name = "llava"
    title = "LLaVA-1.5"
    model_types = ("llava",)
    presets = tuple(PRESETS)
    model_class = LlavaForConditionalGeneration  # what ``load`` builds

    def core(self, model):
        if isinstance(model, LlavaForConditionalGeneration):
            return model.model
        if isinstance(model, LlavaModel):
            return model
        return None

    # ------------------------------------------------------------------ language side

    def modalities(self, module) -> tuple[tuple[int, tuple[str, ...], str], ...]:
        """(placeholder token id, pixel arguments, ``mm_encoder_outputs`` key) of every modality whose
        features the core scatters into the sequence; subclasses with videos add theirs."""
        return ((module.config.image_token_id, ("pixel_values",), "image"),)

    def call_inputs(self, module, args, kwargs) -> CallInputs:
        given = hfcompat.bound_arguments(module, args, kwargs)
        input_ids, embeds = given.get("input_ids"), given.get("inputs_embeds")
        if input_ids is None and embeds is None:
            from ..errors import CMAIStateError

            raise CMAIStateError("CMAI needs input_ids or inputs_embeds")
        # generate() may hand the prefill precomputed features (mm_encoder_outputs) instead of pixels
        encoded = hfcompat.encoder_outputs(given)
        image_mask = None
        features = markers = False
        for token_id, pixel_args, encoded_key in self.modalities(module):
            carried = any(given.get(a) is not None for a in pixel_args) or encoded.get(encoded_key) is not None
            if input_ids is not None:
                here = input_ids == token_id
            else:
                # the same test get_placeholder_mask applies before features are scattered in
                marker = module.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
                here = (embeds == marker).all(-1)
                markers = markers or bool(here.any())
            features = features or carried
            # positions are typed by what they receive: without pixels nothing receives features,
            # so a generated token that happens to have a placeholder's id is text
            here = here if carried else torch.zeros_like(here)
            image_mask = here if image_mask is None else image_mask | here
        if input_ids is None and not features:
            past = hfcompat.cache_of(given)
            if (past is None or past.get_seq_length() == 0) and not markers:
                from ..errors import CMAIStateError

                raise CMAIStateError(
                    "CMAI cannot find image positions in an inputs_embeds-only call: the image features are "
                    "already merged. Pass input_ids (with <image> tokens) or inputs_embeds holding the "
                    "<image> token embedding together with pixel_values.")
        return CallInputs(image_mask, given.get("attention_mask"), hfcompat.cache_of(given))

    def decoder_query_key(self, attention, hidden_states, position_embeddings, query_rows):
        # the rotary function of the attention's own modeling module (Llama, Mistral, Qwen2 ... each define one)
        rotary = hfcompat.modeling_function(attention, "apply_rotary_pos_emb")
        if rotary is None or position_embeddings is None:
            raise UnsupportedModelError(f"{type(attention).__name__}: no rotary position embedding to follow")
        B, Q, _ = hidden_states.shape
        d = attention.head_dim
        cos, sin = position_embeddings
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        batch = torch.arange(B, device=hidden_states.device)
        rows = hidden_states[batch, query_rows].unsqueeze(1)                               # (B, 1, D)
        q = attention.q_proj(rows).view(B, 1, -1, d).transpose(1, 2)                       # (B, H, 1, d)
        k = attention.k_proj(hidden_states).view(B, Q, -1, d).transpose(1, 2)               # (B, Hkv, Q, d)
        # rotate the query with its own row's angles and the keys with theirs (one call each, as the layer does)
        q, _ = rotary(q, q, cos[batch, query_rows].unsqueeze(1), sin[batch, query_rows].unsqueeze(1))
        _, k = rotary(k, k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        return q, k, attention.scaling

    # ------------------------------------------------------------------ vision side
    def tower_geometry(self, model) -> TowerGeometry:
        core = self.core(model)
        vision_model = _vision_model(core)
        vcfg = core.vision_tower.config
        num_layers = len(vision_model.encoder.layers)
        chosen = core.config.vision_feature_layer
        chosen = [chosen] if isinstance(chosen, int) else list(chosen)
        layers = tuple(i if i >= 0 else num_layers + 1 + i for i in chosen)
        if any(not 0 <= i <= num_layers for i in layers):
            raise UnsupportedModelError(f"vision_feature_layer={core.config.vision_feature_layer} is out of range "
                                        f"for {num_layers} encoder layers")
        strategy = core.config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise UnsupportedModelError(f"vision_feature_select_strategy={strategy!r}; focusvlm handles "
                                        "'default' (CLS dropped) and 'full'")
        side = vcfg.image_size // vcfg.patch_size
        has_cls = getattr(vision_model.embeddings, "class_embedding", None) is not None
        return TowerGeometry(grid=(side, side), patch_size=vcfg.patch_size, num_layers=num_layers,
                             feature_layers=layers, has_cls=has_cls, keeps_cls=strategy == "full")

    def vision_tower(self, model):
        return self.core(model).vision_tower

    def encoder_layers(self, model):
        return _vision_model(self.core(model)).encoder.layers

    def add_tower_stage(self, model, layer_idx: int, stage: TowerStage) -> Callable[[], None]:
        layer = _vision_model(self.core(model)).encoder.layers[layer_idx]
        if type(layer) is not CLIPEncoderLayer:
            raise UnsupportedModelError(f"encoder layer {layer_idx} is a {type(layer).__name__}, expected a "
                                        "stock CLIPEncoderLayer")
        layer._focusvlm_stage = stage
        layer.__class__ = StagedCLIPEncoderLayer

        def undo() -> None:
            layer.__class__ = CLIPEncoderLayer
            del layer._focusvlm_stage
        return undo

    def tower_qk(self, layer, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        attn = layer.self_attn
        B, N, _ = normed.shape
        q = attn.q_proj(normed).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        return q, k, attn.scale

    def tower_cls_qk(self, layer, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Like ``tower_qk`` but only the CLS query: q (B, heads, d) — one row instead of N."""
        attn = layer.self_attn
        B, N, _ = normed.shape
        q = attn.q_proj(normed[:, :1]).view(B, attn.num_heads, attn.head_dim)
        k = attn.k_proj(normed).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        return q, k, attn.scale

    def capture_layer_input(self, model, layer_idx: int):
        layer = _vision_model(self.core(model)).encoder.layers[layer_idx]
        box: dict[str, Any] = {}

        def grab(module, args, kwargs):
            box["z"] = args[0] if args else kwargs["hidden_states"]

        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)

        def take():
            if "z" not in box:
                raise RuntimeError(f"encoder layer {layer_idx}'s input was not captured in this forward")
            return layer, box.pop("z")
        return take, handle.remove

    def reduce_projector_input(self, model, reduce):
        core = self.core(model)
        projector = core.multi_modal_projector
        stock_forward = projector.forward
        keeps_cls = core.config.vision_feature_select_strategy == "full"

        def forward(features: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            features = torch.cat([features[:, :1], reduce(features[:, 1:])], dim=1) if keeps_cls else reduce(features)
            return stock_forward(features, *args, **kwargs)

        projector.forward = forward

        def undo() -> None:
            del projector.forward
        return undo

    def capture_layer_output(self, model, layer_idx: int):
        layer = _vision_model(self.core(model)).encoder.layers[layer_idx]
        box: dict[str, Any] = {}

        def grab(module, args, kwargs, output):
            box["io"] = (args[0] if args else kwargs["hidden_states"],
                         output[0] if isinstance(output, (tuple, list)) else output)

        handle = layer.register_forward_hook(grab, with_kwargs=True)

        def take():
            if "io" not in box:
                raise RuntimeError(f"encoder layer {layer_idx}'s output was not captured in this forward")
            return (layer, *box.pop("io"))
        return take, handle.remove

    def replace_projector_input(self, model, replace):
        return _wrap_projector(self.core(model), lambda stock, features: stock(replace(features)))

    def reduce_projector_output(self, model, reduce):
        return _wrap_projector(self.core(model), lambda stock, features: reduce(stock(features)))

    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        core = self.core(model)
        out = core.get_image_features(pixel_values=pixel_values, vision_feature_layer=core.config.vision_feature_layer,
                                      vision_feature_select_strategy=core.config.vision_feature_select_strategy)
        feats = getattr(out, "pooler_output", out)
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def patch_processor(self, model, processor, patches_for_grid):
        for name in ("replace_image_token", "_get_num_multimodal_tokens", "patch_size", "image_token"):
            if not hasattr(processor, name):
                raise UnsupportedModelError(f"the processor {type(processor).__name__} has no {name}; "
                                            "focusvlm adjusts LlavaProcessor placeholder counts")
        geometry = self.tower_geometry(model)
        if processor.patch_size != geometry.patch_size:
            from ..errors import ConfigError

            raise ConfigError(f"processor patch_size={processor.patch_size} does not match the vision tower's "
                              f"{geometry.patch_size}")
        patches_for_grid(geometry.grid)  # fail now, not on the first call, if the count cannot be known
        stock_replace = processor.replace_image_token
        stock_count = processor._get_num_multimodal_tokens
        p = processor

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
            stock = stock_replace(image_inputs, image_idx, **kwargs)
            h, w = hfcompat.image_height_width(image_inputs["pixel_values"][image_idx])
            grid = (h // p.patch_size, w // p.patch_size)
            extra = len(stock) // len(p.image_token) - grid[0] * grid[1]  # CLS or other extra tokens, as stock
            return p.image_token * (patches_for_grid(grid) + extra)

        def _get_num_multimodal_tokens(image_sizes=None, **kwargs: Any):
            data = stock_count(image_sizes=image_sizes, **kwargs)
            if image_sizes is not None and getattr(data, "num_image_tokens", None) is not None:
                crop = p._merge_kwargs(**kwargs)["images_kwargs"].get("crop_size") or p.image_processor.crop_size
                grid = (crop["height"] // p.patch_size, crop["width"] // p.patch_size)
                delta = grid[0] * grid[1] - patches_for_grid(grid)
                data.num_image_tokens = [n - delta for n in data.num_image_tokens]
            return data

        return override_on_instance(processor, replace_image_token=replace_image_token,
                                    _get_num_multimodal_tokens=_get_num_multimodal_tokens)

    # ------------------------------------------------------------------ building and loading
    def load(self, source, dtype=None, device=None, **kwargs):
        from transformers import AutoProcessor

        model = self.model_class.from_pretrained(source, dtype=dtype, **kwargs)
        if device is not None and "device_map" not in kwargs:
            model = model.to(device)
        processor = AutoProcessor.from_pretrained(source)
        return model.eval(), processor

    def random_model(self, preset, seed=0, dtype=torch.float32, attn_implementation="sdpa", **overrides):
        return random_llava(preset, seed=seed, dtype=dtype, attn_implementation=attn_implementation, **overrides)


def llava_core(model: torch.nn.Module) -> LlavaModel:
    """The ``LlavaModel`` of a LLaVA model (kept for code written against the first release)."""
    core = LlavaAdapter().core(model)
    if core is None:
        from . import supported

        raise UnsupportedModelError(f"not a LLaVA-1.5 model: {type(model).__name__}; supported: {supported()}")
    return core
