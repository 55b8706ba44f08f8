"""CMAI as a registered method: its config and how it binds to a model.

The equations are in ``focus.py`` (focus scores, thresholds), the per-layer
attention in ``attention.py``, the per-call bookkeeping in ``state.py`` and
the model wiring in ``wiring.py``; docs/method.md numbers the equations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, check_layer_list, fail
from ..methods import Method, register_method
from .focus import FOCUS_VARIANTS

CMAI_SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class CMAIConfig:
    """Cross-modality attention inhibition in the language model.

    gamma_max: the largest inhibition quantile (share of image keys each text
        token stops attending to), in [0, 1).
    schedule: "linear" (gamma_l = gamma_max * l / (L - 1), layer 0 never
        inhibited), "constant" (gamma_max in every layer) or an explicit list
        with one gamma per decoder layer (docs/method.md, C9).
    focus: which registered text-to-image focus score ranks the image keys
        ("neighborhood" is the paper's method, C5; "tia", "sum", "discounted"
        its ablations, C10-C12; ``focus.register_focus`` adds more).
    discount: lambda of the "discounted" focus score, in (0, 1].
    layers: restrict inhibition to these decoder layer indices (None = all).
    """

    gamma_max: float = 0.6
    schedule: str | tuple[float, ...] = "linear"
    focus: str = "neighborhood"
    discount: float = 0.9
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        name = "CMAIConfig"
        if not isinstance(self.gamma_max, (int, float)) or not 0.0 <= self.gamma_max < 1.0:
            fail(name, "gamma_max", f"must be a number in [0, 1), got {self.gamma_max!r}")
        if isinstance(self.schedule, str):
            if self.schedule not in CMAI_SCHEDULES:
                fail(name, "schedule", f"unknown schedule {self.schedule!r}; use one of "
                      f"{', '.join(CMAI_SCHEDULES)} or a list of per-layer gammas")
        else:
            gammas = tuple(float(g) for g in self.schedule)
            if not gammas:
                fail(name, "schedule", "an explicit schedule needs at least one gamma")
            bad = [g for g in gammas if not 0.0 <= g < 1.0]
            if bad:
                fail(name, "schedule", f"every gamma must be in [0, 1), got {bad}")
            object.__setattr__(self, "schedule", gammas)
        if self.focus not in FOCUS_VARIANTS:
            fail(name, "focus", f"unknown focus score {self.focus!r}; use one of {', '.join(FOCUS_VARIANTS.names())}")
        if not isinstance(self.discount, (int, float)) or not 0.0 < self.discount <= 1.0:
            fail(name, "discount", f"must be in (0, 1], got {self.discount!r}")
        object.__setattr__(self, "layers", check_layer_list(name, "layers", self.layers, allow_empty=True))

    def gammas(self, num_layers: int) -> list[float]:
        """The inhibition quantile of every decoder layer of a model with ``num_layers`` layers."""
        if isinstance(self.schedule, tuple):
            if len(self.schedule) != num_layers:
                raise ConfigError(
                    f"CMAIConfig.schedule: lists {len(self.schedule)} gammas but the language model has "
                    f"{num_layers} decoder layers")
            gammas = list(self.schedule)
        elif self.schedule == "constant":
            gammas = [float(self.gamma_max)] * num_layers
        else:  # linear; a one-layer model has nothing to ramp over
            gammas = [self.gamma_max * l / (num_layers - 1) if num_layers > 1 else float(self.gamma_max)
                      for l in range(num_layers)]
        if self.layers is not None:
            too_big = [i for i in self.layers if i >= num_layers]
            if too_big:
                raise ConfigError(f"CMAIConfig.layers: {too_big} out of range for {num_layers} decoder layers")
            chosen = set(self.layers)
            gammas = [g if l in chosen else 0.0 for l, g in enumerate(gammas)]
        return gammas




@register_method
class CMAI(Method):
    """Cross-modality attention inhibition in every decoder layer of the language model."""

    name = "cmai"
    config_class = CMAIConfig
    side = "llm"
    summary = "cmai[:gamma_max] cross-modality attention inhibition (default gamma_max 0.6)"
    cli_arg = "gamma_max"

    @classmethod
    def inhibited_layers(cls, config: CMAIConfig, num_layers: int) -> int:
        return sum(g > 0 for g in config.gammas(num_layers))

    def __init__(self, model: Any, adapter: Any, config: CMAIConfig, processor: Any | None = None):
        from .cmai_wiring import CMAIBinding, guard_generate

        super().__init__(model, adapter, config, processor)
        num_layers = len(adapter.decoder_attention_modules(model))
        self.binding = CMAIBinding(model, adapter, config.gammas(num_layers), config.focus, config.discount)
        guard_generate(model)

    @property
    def state(self):
        return self.binding.state

    def remove(self, processor: Any | None = None) -> None:
        from .cmai_wiring import unguard_generate

        self.binding.remove()
        unguard_generate(self.model)
