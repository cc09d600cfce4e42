"""The exporter: cuts a Hugging Face model into per-block ONNX files plus a manifest.

    hermes-ort export (--preset NAME | --model PATH_OR_HUB_ID) --out DIR [--layers-per-block N]

writes DIR/manifest.json (hermes_ort.manifest), DIR/blocks/<block>.onnx + <block>.data (weights,
64 KiB-aligned, mmapped by ORT), DIR/blocks/shared.data (weights several blocks read, e.g. GPT-2's
tied embedding/head) and DIR/full/model.onnx + model.onnx_data (the whole model, for baselines).

Stages, one module each: presets/checkpoint (load) -> onnx_export (optimum) -> rewrite (tied
weights) -> stack + cut (blocks) -> storage (ORT optimisation, layout) -> verify -> pipeline
(atomic output directory, manifest) -> cli. Heavy dependencies (torch, transformers, optimum) are
imported only when an export runs.
"""
