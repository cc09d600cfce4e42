"""The mechanism that streams blocks (PIPELOAD): sessions opened as the plan says, loading agents
opening upcoming blocks in parallel, read-ahead, the daemon destroying executed sessions, paged
blocks (sessions kept open on saved packed copies, their pages dropped between runs), the block
engine (the inference agent) and the whole-model engine; the integrity of a model's files and
the process's memory.

May import: hermes_ort.core, hermes_ort.tensors, hermes_ort.planning, hermes_ort.generation,
onnxruntime, psutil.
"""
