"""Waits for the steps of the eztunnel uninstall (Helm post-delete hooks, templates/uninstall.yaml).

Runs in the hook Jobs, with only the Python standard library and the Job's in-cluster
ServiceAccount:

  pods-gone        until no pod matches the agent's label selector (every agent has exited, so
                   none can re-pin what the teardown removes);
  daemonset-ready  until every pod of the teardown DaemonSet is Ready, which its pods only become
                   after their `eztunnel-plugin uninstall` init container succeeded on their node.

Exit 0 when the condition holds, 1 on timeout (the hook, and so `helm uninstall`, fails and the
hook resources stay for inspection), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

Check = Callable[[Mapping[str, Any]], tuple[bool, str]]


def daemonset_ready(ds: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the DaemonSet controller reports every scheduled pod of this generation Ready."""
    generation = ds.get("metadata", {}).get("generation", 0)
    status = ds.get("status") or {}
    observed = status.get("observedGeneration")
    if observed is None or observed < generation:
        return False, f"controller has not observed generation {generation} yet"
    desired = status.get("desiredNumberScheduled", 0)
    ready = status.get("numberReady", 0)
    updated = status.get("updatedNumberScheduled", 0)
    unavailable = status.get("numberUnavailable", 0)
    progress = f"{ready}/{desired} nodes torn down"
    done = ready == desired and updated == desired and not unavailable
    return done, progress


def pods_gone(pods: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a pod list is empty."""
    names = [item.get("metadata", {}).get("name", "?") for item in pods.get("items") or []]
    if names:
        return False, f"{len(names)} agent pod(s) still present: {', '.join(sorted(names)[:5])}"
    return True, "no agent pod left"


class Api:
    """A minimal Kubernetes API client: GET with a bearer token re-read on every call."""

    def __init__(self, server: str, token_file: str | None, ca_file: str | None) -> None:
        self.server = server.rstrip("/")
        self.token_file = token_file
        self.context: ssl.SSLContext | None = None
        if self.server.startswith("https://"):
            self.context = ssl.create_default_context(cafile=ca_file)

    def get(self, path: str, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as f:
                headers["Authorization"] = "Bearer " + f.read().strip()
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
            body: dict[str, Any] = json.load(response)
            return body


def wait(
    fetch: Callable[[], Mapping[str, Any]],
    check: Check,
    *,
    timeout: float,
    interval: float,
    log: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Poll until check(fetch()) holds or timeout passes; API errors are retried, not fatal."""
    deadline = clock() + timeout
    last = ""
    while True:
        try:
            done, progress = check(fetch())
        except (urllib.error.URLError, OSError, ValueError) as e:
            done, progress = False, f"API error: {e}"
        if progress != last:
            log(progress)
            last = progress
        if done:
            return True
        if clock() >= deadline:
            log(f"timed out after {timeout:g} s: {progress}")
            return False
        sleep(interval)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["pods-gone", "daemonset-ready"])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--selector", help="label selector (pods-gone)")
    parser.add_argument("--name", help="DaemonSet name (daemonset-ready)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--server", help="API server URL (default: in-cluster)")
    parser.add_argument("--token-file", default=os.path.join(SA_DIR, "token"))
    parser.add_argument("--ca-file", default=os.path.join(SA_DIR, "ca.crt"))
    args = parser.parse_args(argv)
    if args.what == "pods-gone" and not args.selector:
        parser.error("pods-gone needs --selector")
    if args.what == "daemonset-ready" and not args.name:
        parser.error("daemonset-ready needs --name")
    return args


def in_cluster_server() -> str:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise SystemExit("uninstall_wait: KUBERNETES_SERVICE_HOST is not set; pass --server")
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    server = args.server or in_cluster_server()
    token = args.token_file if os.path.exists(args.token_file) else None
    api = Api(server, token, args.ca_file if server.startswith("https://") else None)
    ns = urllib.parse.quote(args.namespace)
    fetch: Callable[[], Mapping[str, Any]]
    check: Check
    if args.what == "pods-gone":
        selector = args.selector

        def fetch() -> Mapping[str, Any]:
            return api.get(f"/api/v1/namespaces/{ns}/pods", {"labelSelector": selector})

        check = pods_gone
    else:
        path = f"/apis/apps/v1/namespaces/{ns}/daemonsets/{urllib.parse.quote(args.name)}"

        def fetch() -> Mapping[str, Any]:
            return api.get(path)

        check = daemonset_ready

    def log(message: str) -> None:
        print(f"{args.what}: {message}", flush=True)

    done = wait(fetch, check, timeout=args.timeout, interval=args.interval, log=log)
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
