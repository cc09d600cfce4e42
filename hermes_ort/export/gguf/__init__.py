"""GGUF files (llama.cpp's format) as an export's source: `hermes-ort export --model FILE.gguf`.

One module each: reader (the file opened and checked, numpy only, before torch; its metadata as a
transformers config) -> ggml (each GGML block type as the NBitsWeight MatMulNBits holds exactly,
export/nbits.py) -> weights (the tensors under transformers' names: float32 or packed, Q/K rows
un-permuted) -> tokenizer (tokenizer.json, tokenizer_config.json with the chat template,
generation_config from the file's fields) -> source (the export's Source: a torch model of the
dequantized weights for the reference and the fp32 path, and the manifest's record of what was
kept). The fused graph (export/fused.py) emits the kept weights."""
