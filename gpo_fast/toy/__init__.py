"""The toy world: a CPU-sized dot-counting task where the whole GPO loop runs (docs/toy-world.md)."""
