"""One model on this board: `HermesModel` (run, generate, plan for a batch), the planning that
`load` does (cost models, page-cache policy, the batch's plan), and the `Model` protocol that a
model over several boards implements too.

May import: every layer below (core .. measure).
"""
