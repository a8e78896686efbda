"""Benchmarks: `imagegenx bench`. Scenarios measured beside peers (plain diffusers and its fast
recipe) in the same process; full size on a GPU, a tiny smoke mode on the CPU for CI."""
