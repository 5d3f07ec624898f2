"""Parameter-efficient fine-tuning: LoRA, DoRA and QLoRA (NF4 base weights), applied to a model from outside.
Adapters in PEFT's file format are read and written by `verse.interop.adapter`."""

from verse.peft.lora import LoraArgs, LoraExperts, LoraLinear, apply_lora, lora_modules, merge_lora
from verse.peft.qlora import quantize_nf4_

__all__ = ["LoraArgs", "LoraExperts", "LoraLinear", "apply_lora", "lora_modules", "merge_lora", "quantize_nf4_"]
