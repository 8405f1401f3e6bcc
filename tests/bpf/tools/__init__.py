"""Helpers of the BPF tests: socket daemons, handshake tools, the pairing arena."""

from pathlib import Path

TOOLS = Path(__file__).parent
