"""Pure-torch references of every op. Tests, benchmarks and the ``reference`` backend import them here."""
