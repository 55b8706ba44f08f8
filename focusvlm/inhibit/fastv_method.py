"""FastV as a registered LLM-side method: config, binding and the removal of tokens from later layers.

The token choice is a pure function (``focusvlm.inhibit.fastv``); this module
wires it into the language model through the family adapter:

* a pre-hook on the call module records each call (image positions, padding,
  cache length), as the CMAI wiring does;
* a pre-hook on the attention of decoder layer K - 1 scores the image tokens
  in the prefill: the head-mean attention of each sample's last token,
  recomputed for that one query row from the layer's own q/k (the stock fused
  kernel keeps running; it returns no weights);
* a pre-hook on decoder layer K cuts the hidden states to the kept positions
  (text + kept image tokens, ascending), gathers their rotary embeddings and
  position ids (ORIGINAL positions: the official code passes the kept indices
  as position ids) and gives the layer a mask in original positions;
* pre-hooks on layers K + 1 .. reuse those inputs. Layers K .. therefore cache
  only the kept entries (the cache object carries which original positions
  they are), and decoding attends to fewer keys there: faster, not masked.

Samples that keep different counts are left-filled to one rectangle with
entries no query can see. Layers before K see and cache every position; the
cache length generation reads (layer 0) stays the full sequence length, so
new tokens get their ordinary positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .. import hfcompat
from . import fastv
from ..config import ConfigError, fail
from ..errors import CMAIStateError, UnsupportedModelError
from ..methods import Method, SelectionShape, register_method
from ..models.base import FamilyAdapter

COMPILE_ERROR = ("focusvlm FastV cannot run under torch.compile: the kept positions have data-dependent shapes. "
                 "Compile the model without patching, or unpatch first.")
_CACHE_ATTR = "_focusvlm_fastv"


@dataclass(frozen=True)
class FastVConfig:
    """FastV: after decoder layer K, drop the share R of the image tokens the last token attends to least.

    k: the layer from which on the pruned sequence runs (0-based; layers 0..K-1
        see everything, layer K - 1's attention decides). Paper and README: 2.
    ratio: R, the share of each sample's image tokens dropped (paper: 0.5);
        round(n * (1 - R)) are kept, halves to even as the official code rounds.
    keep: an absolute number of image tokens kept per sample instead of R (the
        original LLaVA path's ``fast_v_attention_rank``); None uses R.
    On the command line ``fastv:0.75`` sets R and ``fastv:192`` sets keep.
    """

    k: int = fastv.DEFAULT_K
    ratio: float = fastv.DEFAULT_RATIO
    keep: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            fail("FastVConfig", "k", f"must be an integer >= 1 (layer K - 1's attention decides), got {self.k!r}")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            fail("FastVConfig", "ratio", f"must be a share in [0, 1], got {r!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0):
            fail("FastVConfig", "keep", f"must be None or a non-negative integer, got {self.keep!r}")

    def kept(self, image_tokens: int) -> int:
        """Image tokens one sample with ``image_tokens`` of them keeps from layer K on."""
        return min(self.keep, image_tokens) if self.keep is not None else fastv.keep_count(image_tokens, self.ratio)


def layer_positions(config: FastVConfig, num_layers: int, text_tokens: int, image_tokens: int) -> list[int]:
    """Positions each decoder layer runs on in the prefill of one sample (for FLOP counts):
    everything before layer K, text + kept image tokens from K on."""
    full = text_tokens + image_tokens
    kept = text_tokens + config.kept(image_tokens)
    return [full if layer < config.k else kept for layer in range(num_layers)]


@dataclass
class _Call:
    """One forward call of the language side, as FastV needs it."""

    image_mask: torch.Tensor              # (B, Q) positions receiving image features in this call
    attention_mask: torch.Tensor | None   # (B, past + Q) 2-D padding mask, or None
    past: int                             # entries in the cache of layer 0 before this call
    selection: fastv.FastVSelection | None = None
    replacements: dict[str, Any] | None = None   # the inputs every layer >= K gets in this call

    @property
    def prefill(self) -> bool:
        return self.past == 0


@dataclass
class _Removal:
    """What the cache of the layers >= K holds, per sample: carried by the cache object itself."""

    positions: torch.Tensor   # (B, M) original sequence position of each entry, -1 on fillers
    valid: torch.Tensor       # (B, M) False on fillers and padding
    length: int               # the full sequence length this record covers (what layer 0 caches)


class FastVBinding:
    """FastV switched on for one model; ``remove`` restores the stock model exactly."""

    def __init__(self, model: torch.nn.Module, adapter: Any, config: FastVConfig):
        self.model, self.adapter, self.config = model, adapter, config
        if type(adapter).decoder_query_key is FamilyAdapter.decoder_query_key:
            # the choice at layer K needs the layer's q/k as the family forms them (its rotary embedding)
            raise UnsupportedModelError(f"FastV: the {adapter.title} adapter does not expose its decoder layers' "
                                        "query/key (decoder_query_key), which FastV's choice at layer K needs")
        layers = adapter.decoder_layers(model)
        if config.k >= len(layers):
            raise ConfigError(f"FastVConfig.k={config.k}: the language model has {len(layers)} decoder layers, so K "
                              f"must be at most {len(layers) - 1}")
        self.implementation = adapter.text_attn_implementation(model)
        if self.implementation not in ("sdpa", "eager"):
            raise UnsupportedModelError(f"FastV builds the masks of the pruned layers for 'sdpa' and 'eager' "
                                        f"attention; this model uses {self.implementation!r}")
        text_config = adapter.core(model).language_model.config
        if getattr(text_config, "sliding_window", None) or any(
                t != "full_attention" for t in (getattr(text_config, "layer_types", None) or ())):
            raise UnsupportedModelError("FastV follows full-attention caches only; this language model has "
                                        "sliding-window layers")
        self.k = config.k
        self.call: _Call | None = None
        self.last_positions: torch.Tensor | None = None   # (B, M) kept positions of the last prefill, -1 fillers
        self.last_selection: fastv.FastVSelection | None = None
        attention = adapter.decoder_attention_modules(model)[config.k - 1]
        call_module = adapter.call_module(model)
        self.hooks = [call_module.register_forward_pre_hook(self._begin_call, with_kwargs=True),
                      attention.register_forward_pre_hook(self._score, with_kwargs=True),
                      layers[config.k].register_forward_pre_hook(self._remove, with_kwargs=True)]
        self.hooks += [layer.register_forward_pre_hook(self._follow, with_kwargs=True)
                       for layer in layers[config.k + 1:]]
        if call_module is not model:
            self.hooks.append(model.register_forward_pre_hook(self._check_outer, with_kwargs=True))

    # ------------------------------------------------------------------ per call
    @staticmethod
    def _check_outer(module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise NotImplementedError("FastV removes image positions from the later layers, so the logits no longer "
                                      "line up with labels; a loss with FastV is not supported (unpatch to train)")

    def _begin_call(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            raise RuntimeError(COMPILE_ERROR)
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag) or getattr(module.config, flag, False):
                raise NotImplementedError(f"FastV does not support {flag}=True: the layers after K hold fewer "
                                          "positions, so per-layer outputs would not line up with the input")
        try:
            call = self.adapter.call_inputs(module, args, kwargs)
        except CMAIStateError as exc:
            raise ValueError(str(exc).replace("CMAI", "FastV")) from None
        cache = call.cache
        if cache is not None and getattr(cache, "is_compileable", False):
            raise NotImplementedError("FastV does not support a static (compileable) cache: its layers would all "
                                      "hold the full length. Use the default dynamic cache.")
        past = int(cache.get_seq_length()) if cache is not None else 0
        if past and bool(call.image_mask.any()):
            raise NotImplementedError("FastV prunes image tokens in the prefill only; this call brings image features "
                                      "into a non-empty cache. Start a fresh cache for a new image.")
        if cache is not None and not past and hasattr(cache, _CACHE_ATTR):
            delattr(cache, _CACHE_ATTR)   # a reused, reset cache: its old record is stale
        self.call = _Call(call.image_mask, call.attention_mask, past)
        return None

    def _valid(self, call: _Call, start: int, length: int, batch: int, device) -> torch.Tensor:
        if call.attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        if call.attention_mask.dim() != 2:
            raise NotImplementedError("FastV needs a 2-D padding mask (or none); a prepared 4-D mask cannot be "
                                      "followed into the pruned layers")
        return call.attention_mask[:, start:start + length].to(device=device, dtype=torch.bool)

    # ------------------------------------------------------------------ layer K - 1: the choice
    def _score(self, attention, args, kwargs):
        call = self.call
        if call is None or not call.prefill or not bool(call.image_mask.any()):
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        B, Q = hidden.shape[:2]
        if call.image_mask.shape != (B, Q):
            raise RuntimeError(f"FastV: the call marked image positions of shape {tuple(call.image_mask.shape)} but "
                               f"decoder layer {self.k - 1} sees ({B}, {Q})")
        image_mask = call.image_mask.to(hidden.device)
        valid = self._valid(call, 0, Q, B, hidden.device)
        positions = torch.arange(Q, device=hidden.device)
        # the last real token of each sample: the last row for left padding (official: row -1)
        last = torch.where(valid, positions, -1).max(-1).values.clamp_min(0)
        with torch.no_grad():
            q, k, scale = self.adapter.decoder_query_key(attention, hidden, kwargs.get("position_embeddings"), last)
            logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale           # (B, H, 1, Q)
            visible = valid & (positions <= last[:, None])                                   # causal + padding
            probs = logits.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1)
            scores = fastv.last_token_attention(probs)                                       # (B, Q)
        call.selection = fastv.select(scores, image_mask, self.config.ratio, valid, self.config.keep)
        return None

    # ------------------------------------------------------------------ layer K: the removal
    def _mask(self, key_pos, key_valid, query_pos, dtype, query_filler=None, square=False):
        """The mask layers >= K get, in the form the attention implementation expects."""
        Q = query_pos.shape[1]
        if self.implementation == "sdpa" and bool(key_valid.all()) and (square or Q == 1):
            return None   # plain causal (ascending kept order) or one query over all keys: sdpa's fast path
        allowed = fastv.removal_mask(key_pos, key_valid, query_pos, query_filler)
        if self.implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)

    def _remove(self, layer, args, kwargs):
        inputs = self.adapter.decoder_layer_inputs(args, kwargs)
        cache = inputs["cache"]
        call = self.call
        if call is None:
            if cache is not None and hasattr(cache, _CACHE_ATTR):
                raise RuntimeError("FastV: a pruned cache was used by a call the method did not see (call the "
                                   "whole model, not its language model alone)")
            return None
        hidden = inputs["hidden_states"]
        B, Q = hidden.shape[:2]
        if call.prefill:
            call.replacements = None
            sel = call.selection
            if sel is None or int(call.image_mask.sum()) == int(sel.counts.sum()):
                return None   # nothing dropped (no image, R = 0): this call runs stock
            index = fastv.kept_index(sel.keep.to(hidden.device))                               # (B, M)
            filler = index < 0
            take = index.clamp_min(0)
            hidden = hidden.gather(1, take.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            changes: dict[str, Any] = {"attention_mask": self._mask(index, ~filler, index, hidden.dtype,
                                                                    query_filler=filler, square=True)}
            pe = inputs["position_embeddings"]
            if pe is not None:
                changes["position_embeddings"] = tuple(
                    t.expand(B, -1, -1).gather(1, take.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in pe)
            pid = inputs["position_ids"]
            if isinstance(pid, torch.Tensor) and pid.dim() == 2:
                changes["position_ids"] = pid.expand(B, -1).gather(1, take)
            if cache is not None:
                setattr(cache, _CACHE_ATTR, _Removal(index, ~filler, Q))
            self.last_positions, self.last_selection = index, sel
            call.replacements = changes
            return self.adapter.with_decoder_layer_inputs(args, kwargs, hidden_states=hidden, **changes)
        removal: _Removal | None = getattr(cache, _CACHE_ATTR, None) if cache is not None else None
        if removal is None:
            call.replacements = None
            return None   # the prefill dropped nothing: stock
        held = hfcompat.layer_length(cache, self.k)
        if held != removal.positions.shape[1] or call.past != removal.length:
            raise RuntimeError(f"FastV: the cache holds {call.past} positions ({held} in layer {self.k}) but FastV "
                               f"recorded {removal.length} ({removal.positions.shape[1]}); was it cropped or reused?")
        new_pos = (call.past + torch.arange(Q, device=hidden.device)).expand(B, -1)
        key_pos = torch.cat([removal.positions, new_pos], dim=1)
        key_valid = torch.cat([removal.valid, self._valid(call, call.past, Q, B, hidden.device)], dim=1)
        setattr(cache, _CACHE_ATTR, _Removal(key_pos, key_valid, call.past + Q))
        call.replacements = {"attention_mask": self._mask(key_pos, key_valid, new_pos, hidden.dtype)}
        return self.adapter.with_decoder_layer_inputs(args, kwargs, **call.replacements)

    def _follow(self, layer, args, kwargs):
        call = self.call
        if call is None or call.replacements is None:
            return None
        return self.adapter.with_decoder_layer_inputs(args, kwargs, **call.replacements)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.call = None


@register_method
class FastV(Method):
    """FastV: image tokens the last prompt token ignores leave the LLM after layer K (sequence and cache)."""

    name = "fastv"
    config_class = FastVConfig
    side = "llm"
    summary = ("fastv[:R|keep] FastV, official token choice with real removal after LLM layer K "
               "(default K=2, R=0.5; a whole number > 1 keeps that many image tokens)")
    cli_arg = "ratio"

    @classmethod
    def selection_flops(cls, config: FastVConfig, shape: SelectionShape) -> int:
        # layer K's attention of the last token over the sequence (every head), then a top-k over the image tokens
        return 2 * shape.sequence * shape.llm_width + shape.stock_tokens

    @classmethod
    def parse(cls, value: str | None) -> FastVConfig:
        if value is None or value == "":
            return cls.default_config()
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"method 'fastv': {value!r} is not a number") from None
        if number > 1:
            if not number.is_integer():
                raise ConfigError(f"method 'fastv': a value above 1 is a count of kept image tokens, got {value}")
            return FastVConfig(keep=int(number))
        return FastVConfig(ratio=number)

    @classmethod
    def llm_layer_tokens(cls, config: FastVConfig, num_layers: int, prompt_tokens: int,
                         image_tokens: int) -> list[int]:
        return layer_positions(config, num_layers, prompt_tokens, image_tokens)

    def __init__(self, model: Any, adapter: Any, config: FastVConfig, processor: Any | None = None):
        super().__init__(model, adapter, config, processor)
        self.binding = FastVBinding(model, adapter, config)
        _guard_generate(model)

    @property
    def last_positions(self) -> torch.Tensor | None:
        """(B, M) original positions the layers >= K kept in the last prefill (-1 = filler), or None.
        A prefill's logits (without ``logits_to_keep``) are for these positions, in this order."""
        return self.binding.last_positions

    @property
    def last_selection(self) -> fastv.FastVSelection | None:
        return self.binding.last_selection

    def remove(self, processor: Any | None = None) -> None:
        self.binding.remove()
        _unguard_generate(self.model)


def _guard_generate(model: torch.nn.Module) -> None:
    """Refuse decoding modes that rewrite the cache behind FastV's record of the pruned layers."""
    if "generate" in model.__dict__ or not hasattr(type(model), "generate"):
        return
    original = type(model).generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        if (kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1) > 1:
            raise NotImplementedError("FastV does not support beam search (num_beams > 1): reordering the beams would "
                                      "not reorder its record of the pruned cache. Use greedy or sampling.")
        cache_impl = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if cache_impl not in (None, "dynamic"):
            raise NotImplementedError(f"FastV does not support cache_implementation={cache_impl!r}; use the default "
                                      "dynamic cache.")
        if kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)):
            raise NotImplementedError("FastV chooses the image tokens from the whole prompt in one prefill; a chunked "
                                      "prefill (prefill_chunk_size) is not supported.")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") or \
                (kwargs.get("penalty_alpha") or 0) > 0:
            raise NotImplementedError("FastV does not support assisted or contrastive decoding: both crop the cache.")
        return original(model, *args, **kwargs)

    generate._focusvlm_fastv = True
    model.generate = generate


def _unguard_generate(model: torch.nn.Module) -> None:
    if getattr(model.__dict__.get("generate"), "_focusvlm_fastv", False):
        del model.__dict__["generate"]
