"""The test and benchmark harness: what tests (unit, integration, e2e, faults) and benchmarks
share, one module per concept.

- ``waits``: free ports and bounded waits;
- ``procs``: child processes, each stopped by its PID; ``manage.py`` commands;
- ``env``: the environment of child processes;
- ``cluster``: daphne edges, relays and other processes started together, stopped together;
- ``peer``: a ``tyrum-v1`` peer written from docs/protocol.md on the stock ``websockets`` client;
- ``inprocess``: the same peer against the ASGI application in this process (no server),
  the in-memory channel layer and an in-process relay;
- ``data``: tenants, tokens, publishing and waits on the outbox, through the ORM;
- ``testdb``: the test database shared, committed, with other threads and processes;
- ``scratch``: scratch PostgreSQL databases and Django set-up for benchmarks.

Import it from the repository root (pytest's ``pythonpath``; benchmarks put the root on
``sys.path``). Nothing here is imported by the product.
"""
