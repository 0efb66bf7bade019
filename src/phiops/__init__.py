"""phiops: fine-tune, quantize, gate, approve and serve Phi-family small language models."""

__version__ = "0.1.0"
