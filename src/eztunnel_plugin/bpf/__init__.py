"""The kernel side: bpf(2) calls, the C structs mirror, loading, pins and maps."""
