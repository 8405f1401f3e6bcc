"""The kernel side: syscalls (bpf(2)), layout (the C structs mirror), paths (where the
pins live), maps (one class per map, the Dataplane handle), loader (install, upgrade,
uninstall)."""
