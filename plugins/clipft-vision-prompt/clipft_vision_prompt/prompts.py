"""``vision-prompt``'s tokens: :class:`clipft.prompt_kit.VisionPrompts` (public,
shared with other prompt methods), kept importable under this name."""
from clipft.prompt_kit import VisionPrompts

__all__ = ["VisionPrompts"]
