"""After's benchmark (issue 6): After beside the database's own limit and its peers.

Run it with ``python -m bench`` (``make bench``), or ``python -m bench --quick``
(``make bench QUICK=1``, under a minute). Every scenario runs the real CLI worker
processes (``python -m after start NAME --foreground``) against the embedded
PouchDB Server started in a temporary directory, or any server given with
``--url``. Results: a table on the terminal, ``bench/results/latest.json``,
PNG plots beside it, and a dated summary appended to ``docs/benchmarks.md``.
"""
