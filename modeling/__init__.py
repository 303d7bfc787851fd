"""The hybrid_mamba model classes, registered with the transformers Auto classes on import."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from hybrid_mamba.configuration import HybridMambaConfig

from .modeling_hybrid_mamba import (
    HybridMambaForCausalLM,
    HybridMambaForSequenceClassification,
    HybridMambaModel,
    HybridMambaPreTrainedModel,
)

AutoConfig.register(HybridMambaConfig.model_type, HybridMambaConfig, exist_ok=True)
AutoModel.register(HybridMambaConfig, HybridMambaModel, exist_ok=True)
AutoModelForCausalLM.register(HybridMambaConfig, HybridMambaForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HybridMambaConfig, HybridMambaForSequenceClassification, exist_ok=True)

__all__ = [
    "HybridMambaConfig",
    "HybridMambaPreTrainedModel",
    "HybridMambaModel",
    "HybridMambaForCausalLM",
    "HybridMambaForSequenceClassification",
]
