"""The FLUX.2 model families, named by the diffusers pipeline class in a checkpoint's model_index.json."""

from enum import StrEnum


class Family(StrEnum):
    DEV = "Flux2Pipeline"  # FLUX.2 [dev]: Mistral Small 3.1 text encoder, guidance embedding
    KLEIN = "Flux2KleinPipeline"  # FLUX.2 [klein] 4B/9B: Qwen3 text encoder, true CFG (base) or distilled

    @property
    def default_text_layers(self) -> tuple[int, ...]:
        """The hidden-state indices diffusers reads when the checkpoint records none."""
        return {Family.DEV: (10, 20, 30), Family.KLEIN: (9, 18, 27)}[self]

    @classmethod
    def names(cls) -> str:
        return ", ".join(member.value for member in cls)
