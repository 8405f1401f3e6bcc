"""What the agent serves: the gRPC Inspector, the admin socket, metrics."""
