"""User-facing measurements: parity against ReferenceUNet and the benchmark suite."""
