"""Benchmarks of fastlora: run from the repository root as python -m benchmarks.<name>."""
