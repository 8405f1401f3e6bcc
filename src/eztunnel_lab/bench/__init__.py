"""The benchmarks: one module per section (dataplane, xds, ambient), each giving
metric.Metric values; cli.py runs and records them, plot.py draws them."""
