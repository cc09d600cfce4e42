"""Tensors between blocks, as data: the model's inputs checked and sampled, the routing of
tensors by name from block to block, a decoder's KV-cache signature, the shape of a batch and its
micro-batches.

May import: hermes_ort.core.
"""
