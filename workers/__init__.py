"""Per-item logic of every stage, plain Python: no Ray, no Redis (``cluster/`` moves messages)."""
