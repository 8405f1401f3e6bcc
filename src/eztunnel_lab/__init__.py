"""eztunnel-lab: the simulator, the demo, the fake istiod and the benchmarks.

Development and test tooling around the agent, packaged apart from it (lab/pyproject.toml):
it imports the agent (eztunnel_plugin), never the other way round, and the agent's image
does not ship it (tests/test_house.py keeps that border).
"""

__version__ = "0.1.0"
