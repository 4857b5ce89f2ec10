"""The front end: sources, the motion gate, detectors, matting, and the ingest and detect stages."""
