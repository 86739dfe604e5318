"""Quantization: per-layer fake quantization for training (fake) and mixed-precision QDQ export
(qdq)."""
