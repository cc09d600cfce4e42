"""The exporter: cuts a Hugging Face model into per-block ONNX files plus a manifest.

    hermes-ort export (--preset NAME | --model PATH_OR_HUB_ID | --model FILE.gguf) --out DIR

writes DIR/manifest.json (hermes_ort.core.manifest), DIR/blocks/<block>.onnx + <block>.data
(weights, 64 KiB-aligned, mmapped by ORT), DIR/blocks/shared.data (weights several blocks
read, e.g. GPT-2's tied embedding/head) and DIR/full/model.onnx + model.onnx_data (the whole
model, for baselines).

One module each: sources (presets, checkpoint, gguf/: what is exported) -> pipeline (the stages) ->
onnx_export (optimum) -> whole_model (the baselines' files; rewrite: tied weights) -> blocks (stack
+ cut: the blocks; storage: ORT optimisation, layout; verify: against PyTorch) -> streaming (the
other layers of a large checkpoint) -> install (the atomic output directory) -> cli. Heavy
dependencies (torch, transformers, optimum) are imported only when an export runs.
"""
