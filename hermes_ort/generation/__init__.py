"""Text generation as a loop over passes, no ONNX Runtime: the prefill and decode steps with the
KV cache, sampling, their statistics, and the tokenizers.

May import: hermes_ort.core, hermes_ort.tensors.
"""
