"""Mixer registry and the hybrid layer pattern.

A mixer registers under a name with the class Megatron builds in a TransformerLayer's
``self_attention`` slot and what it supports. ``--la-module NAME`` picks the mixer for every 'L'
position of ``--layer-type-list``; 'N' positions get the base preset's softmax attention.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

LINEAR = "L"
SOFTMAX = "N"
PATTERN_CHARS = (LINEAR, SOFTMAX)


@dataclass(frozen=True)
class MixerEntry:
    name: str
    builder: type
    paper: str
    kernel: str
    supports_tp: bool = True
    supports_cp: bool = False
    supports_varlen: bool = False
    supports_decode: bool = False
    # Capturable in a CUDA graph (--cuda-graph-impl full_iteration): no host syncs in fwd/bwd.
    cuda_graph: bool = True
    modes: tuple[str, ...] = ("chunk", "fused_recurrent")
    # Mixer-specific defaults for the --la-* config fields the user did not set.
    defaults: dict = field(default_factory=dict)
    # The mixer-specific --la-* config fields this mixer reads. A field that some mixer lists
    # here is mixer-specific: validate_args refuses a non-default value of it for any mixer that
    # does not list it (see mixer_option_errors).
    options: tuple[str, ...] = ()

    def support_flags(self) -> str:
        flags = {"tp": self.supports_tp, "cp": self.supports_cp,
                 "varlen": self.supports_varlen, "decode": self.supports_decode,
                 "cuda_graph": self.cuda_graph}
        return " ".join(f"{k}={'yes' if v else 'no'}" for k, v in flags.items())


_REGISTRY: dict[str, MixerEntry] = {}
_MIXER_MODULES = "linear_moe.mixers"


def register_mixer(name: str, **entry_fields) -> Callable[[type], type]:
    """Class decorator: ``@register_mixer("gla", paper=..., kernel=...)``."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].builder is not cls:
            raise ValueError(f"mixer '{name}' is registered twice "
                             f"({_REGISTRY[name].builder.__qualname__} and {cls.__qualname__})")
        _REGISTRY[name] = MixerEntry(name=name, builder=cls, **entry_fields)
        return cls

    return wrap


def _load_builtin_mixers() -> None:
    importlib.import_module(_MIXER_MODULES)


def registered_mixers() -> dict[str, MixerEntry]:
    _load_builtin_mixers()
    return dict(sorted(_REGISTRY.items()))


def get_mixer(name: str) -> MixerEntry:
    mixers = registered_mixers()
    if name not in mixers:
        raise ValueError(f"unknown mixer '{name}' for --la-module; registered mixers: "
                         f"{', '.join(mixers)}")
    return mixers[name]


def mixer_specific_options() -> set[str]:
    """The --la-* fields some mixer lists in its ``options``."""
    return {name for entry in registered_mixers().values() for name in entry.options}


def unused_option_error(entry: MixerEntry, name: str) -> str:
    """The one-line error for a mixer-specific option set on a mixer that does not read it."""
    flag = "--" + name.replace("_", "-")
    users = [n for n, e in registered_mixers().items() if name in e.options]
    return (f"mixer '{entry.name}' does not use {flag}; drop it (it applies to: "
            f"{', '.join(users)})")


def expand_layer_pattern(pattern: str, num_layers: int) -> str:
    """Return the per-layer pattern ('L'/'N' per layer) for ``num_layers`` layers.

    A pattern as long as the model is used as is; a shorter one repeats only when it divides
    ``num_layers`` evenly, so a typo cannot silently produce a different model.
    """
    if not pattern:
        raise ValueError("--layer-type-list is empty; give one character per layer "
                         f"('{LINEAR}' linear mixer, '{SOFTMAX}' softmax attention), e.g. LLLN")
    bad = sorted({c for c in pattern if c not in PATTERN_CHARS})
    if bad:
        raise ValueError(f"--layer-type-list '{pattern}' has invalid character(s) {bad}; use only "
                         f"'{LINEAR}' (linear mixer) and '{SOFTMAX}' (softmax attention)")
    if len(pattern) == num_layers:
        return pattern
    if num_layers % len(pattern) == 0:
        return pattern * (num_layers // len(pattern))
    raise ValueError(f"--layer-type-list '{pattern}' has {len(pattern)} layers, which neither "
                     f"equals nor divides --num-layers {num_layers}; give {num_layers} characters "
                     f"or a pattern whose length divides {num_layers}")
