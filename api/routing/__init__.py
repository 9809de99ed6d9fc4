"""The inference router: the API holds no model; it picks a live serving replica for each request and
forwards it (`pool.py` chooses, `forwarder.py` relays). Which weights a model id names
(`api/core/route_targets.py`) and the LoRA folders external engines load (`api/core/lora_exports.py`) live in
the core, because a reinforcement job's worker reaches the same replicas for its model graders."""
