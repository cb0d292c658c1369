"""expertlora: Mixture-of-Experts models with LoRA on their experts, never merged."""

from .errors import AdapterError
from .formats import FORMATS, load_adapter, open_adapter
from .lora import AdapterInfo, ExpertLoRA, LayerLoRA, LoRASpec, ModuleLoRA, ProjLoRA, lora_scaling
from .model_config import MoEConfig

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "ExpertLoRA",
    "FORMATS",
    "LayerLoRA",
    "LoRASpec",
    "ModuleLoRA",
    "MoEConfig",
    "ProjLoRA",
    "load_adapter",
    "lora_scaling",
    "open_adapter",
]
__version__ = "0.1.0"
