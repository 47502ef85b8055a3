"""Base-model presets: name -> BasePreset (config flags per size + the non-mixer specs)."""

from linear_moe.models import deepseek_v2, llama3, mixtral, qwen2_moe
from linear_moe.models.common import BasePreset

PRESETS: dict[str, BasePreset] = {
    p.name: p for p in (qwen2_moe.PRESET, deepseek_v2.PRESET, mixtral.PRESET, llama3.PRESET)}


def get_preset(name: str) -> BasePreset:
    if name not in PRESETS:
        raise ValueError(f"unknown --base-model '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
