"""One model over several boards on a Ray cluster: the split into stages, a stage's runner (the
single-board engine), and the Ray side (connecting, the stage actor, placement, the driver).
Only this package imports Ray, and only when `load(..., cluster=...)` is called.

May import: every layer below (core .. runtime) and ray.
"""
