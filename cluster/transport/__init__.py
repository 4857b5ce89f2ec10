"""The only door to Redis: connections, the stream bus, key names, QA's reads and writes."""
