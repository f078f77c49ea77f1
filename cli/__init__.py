"""The top layer: the `tuneloop` command, the demo, and the launchers they (and the tests and benchmarks) share.

Nothing imports this package; it may import every other one.
"""
