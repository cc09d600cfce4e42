"""Measurement on this machine: the layer profiler, calibration by real pipelined passes, and
fresh child processes (peak memory is only comparable between fresh processes).

May import: every layer below (core .. streaming).
"""
