"""Parameter-efficient methods, one small file each, behind the protocol in ``base``."""
from align.adapters import bottleneck, lora, prefix  # noqa: F401  (register the methods)
from align.adapters import full, ia3, llama_adapter, prompt, ptuning  # noqa: F401
from align.adapters.base import METHODS, AdapterConfig, AdapterSet, create_adapter_set  # noqa: F401
