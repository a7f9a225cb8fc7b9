"""Benchmarks: stepsafe against raw I/O, its peers and the machine's limits, in one run.

Entry point: ``benchmarks/run`` (bash); it sets up ``.venv-bench`` and calls ``benchmarks.run``.
"""
