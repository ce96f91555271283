"""TeleLoRA: zero-shot Trojan mitigation of LLMs with a permutation-symmetric LoRA generator."""

__version__ = "0.1.0"
