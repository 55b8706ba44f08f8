"""The errors focusvlm raises on purpose, in one leaf module.

Every layer raises them and none of them may import a higher layer to do so,
so they live here, importing nothing of focusvlm. Each says what is wrong in
one line; the modules that first defined them re-export them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class UnsupportedModelError(TypeError):
    """focusvlm has no adapter for this model, or the adapter cannot do what was asked."""


class CMAIStateError(RuntimeError):
    """The bookkeeping of an LLM-side method (CMAI's, which FastV shares) cannot follow what the model was asked
    to do: no input_ids nor a recognisable image embedding, a cache it cannot place, ..."""


__all__ = ["CMAIStateError", "ConfigError", "UnsupportedModelError"]
