"""Spec-Bench-style benchmark harness: questions and suites, a method registry (ours and the
transformers peers), the timed runner, metrics, and reports with plots. ``s2d bench`` drives it."""
