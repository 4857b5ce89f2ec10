"""The line simulator and its tooling: simulated lines, harvested crops, annotated videos."""
