"""hermes-ort bench: models x strategies x budgets x device profiles, each configuration in fresh
processes under an emulated edge board; JSON with raw samples, a Markdown table, PNG plots.

One module per concept: matrix (axes, named matrices), cgroups (cgroup v1 groups), device
(emulating a board around one child), child (what runs in each fresh process), models (export,
profile, describe), runner (the matrix), records (samples, medians, floors, ratios, the JSON),
render (Markdown), plots (PNG), progress, cli. Nothing heavy is imported here: the children
import this package too."""
