"""The GPU check's parts (``benchmarks.gpu_staging`` runs them), one idea per module."""
