"""loraclf: LoRA text classifiers on a frozen pretrained encoder, under a trainable-parameter budget."""

__version__ = "0.2.0"
