"""expertlora: Mixture-of-Experts models with LoRA on their experts, never merged."""

from .engine import MoELoRAEngine
from .errors import AdapterError
from .experts import ExpertWeights
from .formats import FORMATS, load_adapter, open_adapter
from .lora import AdapterInfo, ExpertLoRA, LayerLoRA, LoRASpec, ModuleLoRA, ProjLoRA, lora_scaling
from .model_config import MoEConfig

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "ExpertLoRA",
    "ExpertWeights",
    "FORMATS",
    "LayerLoRA",
    "LoRASpec",
    "ModuleLoRA",
    "MoEConfig",
    "MoELoRAEngine",
    "ProjLoRA",
    "load_adapter",
    "lora_scaling",
    "open_adapter",
]
__version__ = "0.1.0"
