"""Lines at run time: settings, the stage loop, actors, line start and stop, registry, metrics."""
