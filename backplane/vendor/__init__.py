"""Third-party internals the backplane relies on, one module per library, each attribute
pinned by tests/unit/test_vendor.py (versions pinned in requirements.txt).

- ``daphne``: direct frame writes, the denial response and slow-consumer bound, probes of
  daphne's, twisted's and autobahn's connection state.
- ``channels_redis``: the relay's pipelined publish of group messages on the pub/sub layer.
- ``channels``: a consumer with no channel of its own.
"""
