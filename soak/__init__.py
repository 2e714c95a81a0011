"""A soak with a nemesis (issue #31): `python -m soak`.

Real worker instances run a database of tasks of every kind while clients steer tasks
and a nemesis kills and pauses instances and restarts or partitions the server; then
a checker holds the tasks against the jobs' own ledger and the clients' moves.

Modules: cli (the command line), options, run (one seed from start to result), tasks
(the task mix), servers (the server under test and its faults), processes (worker
instances), clients, nemesis (the fault schedule and its execution), ledger (what the
jobs recorded), checker (the rules), and jobs/ (the soak's job, `ledger`).
"""
