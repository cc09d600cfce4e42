"""The public entry point: `hermes_ort.load`, one board or a cluster.

May import: every layer below (core .. cluster).
"""
