"""Parameter-efficient fine-tuning: LoRA, DoRA and QLoRA (NF4 base weights), applied to a model from outside,
with adapters in PEFT's file format."""

from verse.peft.adapter import is_adapter_dir, load_adapter, read_adapter_config, save_adapter
from verse.peft.lora import LoraArgs, LoraExperts, LoraLinear, apply_lora, lora_modules, merge_lora
from verse.peft.qlora import quantize_nf4_

__all__ = ["LoraArgs", "LoraExperts", "LoraLinear", "apply_lora", "is_adapter_dir", "load_adapter", "lora_modules",
           "merge_lora", "quantize_nf4_", "read_adapter_config", "save_adapter"]
