"""align: RLHF with every trainable part a parameter-efficient module over one frozen backbone."""
__version__ = "0.1.0"
