"""Base-model presets: name -> BasePreset."""

from linear_moe.models import qwen2_moe
from linear_moe.models.common import BasePreset

PRESETS: dict[str, BasePreset] = {p.name: p for p in (qwen2_moe.PRESET,)}


def get_preset(name: str) -> BasePreset:
    if name not in PRESETS:
        raise ValueError(f"unknown --base-model '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
