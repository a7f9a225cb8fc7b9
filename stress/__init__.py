"""stepsafe's torture harness: campaigns that keep trying to lose or mistake a checkpoint.

``.venv/bin/python -m stress [--short|--full] [--campaign NAME] [--seed N] [--json out.json]``

Each campaign (one module each) states a promise, runs many randomised trials against the real
library (real files, real child processes, SIGKILL, loopback S3/GCS servers) and counts the
trials that break it. Every trial is driven by its own number, printed with any failure, so a
failing case reruns with ``--campaign NAME --seed <number> --trials 1``. The runner
(``runner.py``) prints a table of figures and exits non-zero if any promise was broken.
RELIABILITY.md (repo root) lists the promises and the latest figures.
"""
