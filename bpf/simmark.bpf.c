// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * simmark: give every socket created in a cgroup ztunnel's mark (0x539).
 *
 * The simulator's ztunnel stand-in (HAProxy) cannot set SO_MARK on each socket
 * it creates, but istio-cni's in-pod rules rely on it: marked packets are not
 * redirected again, and marked connections to the app get connmark 0x111 so the
 * app's replies are routed back to the proxy's transparent socket. Attached as
 * BPF_CGROUP_INET_SOCK_CREATE to the stand-in's own cgroup only.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define INPOD_MARK 0x539 /* istio cni/pkg/config InpodMark, ztunnel DEFAULT_INPOD_MARK */

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/sock_create")
int ez_simmark(struct bpf_sock *sk)
{
	sk->mark = INPOD_MARK;
	return 1; /* allow the socket */
}
