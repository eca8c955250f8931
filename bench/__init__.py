"""Benchmarks of legw_fused (installed as ``legw_fused.bench``): named shape sets, timing, results files.

Figures come from these scripts and are saved under bench/results/ with device, versions and commit; see
bench/NOTES.md for predictions and outcomes.
"""
