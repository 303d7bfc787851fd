"""Named model sizes, kept as data in ``presets.yaml``. Parameter counts: ``configuration.param_counts``."""

from functools import lru_cache
from pathlib import Path

import yaml

from .configuration_hybrid_mamba import HybridMambaConfig

PRESETS_FILE = Path(__file__).with_name("presets.yaml")


@lru_cache(maxsize=1)
def load_presets() -> dict[str, dict]:
    with open(PRESETS_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


PRESET_NAMES = tuple(load_presets())


def get_preset(name: str, **overrides) -> HybridMambaConfig:
    """The config of preset `name`, with any field overridden by keyword."""
    presets = load_presets()
    if name not in presets:
        raise ValueError(f"Unknown preset {name!r}; valid presets are {list(presets)}.")
    return HybridMambaConfig(**{**presets[name], **overrides})
