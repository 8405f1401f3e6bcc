"""What the agent knows of the mesh: workloads and policies, nothing of the wire."""
