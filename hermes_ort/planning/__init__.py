"""The pipeline planner and its arithmetic, no ONNX Runtime: the strategies, the stored layer
profile, the cost model (memory and a simulated schedule), paged blocks' costs and policy, the
page-cache policy, and the plan itself (what the engine runs, apart from what it reports).

May import: hermes_ort.core, hermes_ort.tensors.
"""
