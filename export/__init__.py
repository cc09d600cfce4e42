"""The exporter: cuts a Hugging Face model into per-block ONNX files plus a manifest.

Heavy dependencies (torch, transformers, optimum) are imported only when an export runs, so
`import export` stays cheap. Entry points: `export.cli` (the `hermes-ort export` subcommand) and
`export.pipeline.export_model`.
"""
