"""The inference router: the API holds no model; it picks a live serving replica for each request and
forwards it (`pool.py` chooses, `forwarder.py` relays, `targets.py` says which weights a model id names)."""
