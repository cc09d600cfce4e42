"""The data every layer shares, no ONNX Runtime, no psutil: the error contract, byte sizes, the
closed sets of choices (enums), this machine's cores, how a session is opened as data, the
manifest (the one contract with the exporter), a run's statistics and its trace spans.

May import: the standard library and numpy only.
"""
