"""What a benchmark hands the generation engine: :class:`Sample`, and the second
prompt of describe-then-answer.

The lowest eval module (no focusvlm import): the benchmark registry, the
benchmarks and the engine all build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def default_answer_from_description(prompt: str, description: str) -> str:
    """Text-only prompt of the second describe-then-answer step."""
    return (f"Here is a description of an image:\n{description.strip()}\n\n"
            f"Using only this description, respond to the following.\n{prompt}")


@dataclass
class Sample:
    id: str
    image: Any = None  # str | Path | PIL.Image.Image | None
    prompt: str | list[dict] = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt_text(self) -> str:
        """The user-facing text of the prompt (recorded in predictions)."""
        if isinstance(self.prompt, str):
            return self.prompt
        parts = []
        for message in self.prompt:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            else:
                parts.extend(c.get("text", "") for c in content or [] if c.get("type") == "text")
        return "\n".join(parts)


__all__ = ["Sample", "default_answer_from_description"]
