"""Ray and Redis: ``transport`` (Redis), ``runtime`` (actors, lines), ``apps`` (CLI, dashboard)."""
