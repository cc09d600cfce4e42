"""`hermes-ort`: the command line, one subcommand per job, and the demo. Every failure a user can
cause is one line on stderr, never a traceback.

May import: every layer below; the exporter (`hermes_ort.export`) only when `export` runs.
"""
