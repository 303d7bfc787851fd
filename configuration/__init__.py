"""HybridMambaConfig and its named presets."""

from .configuration_hybrid_mamba import LAYER_TYPES, HybridMambaConfig, place_attention_layers
from .presets import PRESET_NAMES, get_preset, load_presets

__all__ = ["HybridMambaConfig", "LAYER_TYPES", "place_attention_layers", "PRESET_NAMES", "get_preset", "load_presets"]
