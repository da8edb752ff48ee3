"""Published-style reference loops kept as yardsticks for the benchmarks (not used by the engine)."""
