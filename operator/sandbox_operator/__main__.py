"""`sandbox-operator run` / `python -m sandbox_operator run`."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys

from sandbox_operator import __version__
from sandbox_operator.api.names import DEFAULT_CLUSTER_CIDRS, DEFAULT_DNS_NAMESPACE, DEFAULT_DNS_POD_LABELS, ENVD_PORT
from sandbox_operator.keys import TOKEN_KEY_ENV, read_token_key


def _label(text: str) -> tuple[str, str]:
    """A KEY=VALUE label of --dns-pod-label."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandbox-operator", description="E2B-style sandboxes on Kubernetes")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="watch only this namespace (repeatable; globs allowed); default: all namespaces",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces (default)")
    run.add_argument("--kubeconfig", default=None, help="kubeconfig path (default: in-cluster, else KUBECONFIG)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--bind-address", default="0.0.0.0", help="address for /metrics and /healthz")
    run.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0 = off)")
    run.add_argument("--liveness-port", type=int, default=8080, help="liveness /healthz port (0 = off)")
    run.add_argument("--workers", type=int, default=16, help="concurrent reconciles")
    run.add_argument("--max-in-flight", type=int, default=64, help="concurrent API requests")
    run.add_argument(
        "--gateway-namespace",
        default="sandbox-system",
        help="namespace of the gateway pods allowed into sandboxes by NetworkPolicy",
    )
    run.add_argument(
        "--normal-events",
        choices=["on", "off"],
        default="on",
        help="post Normal-type Events on transitions (Warnings are always posted)",
    )
    run.add_argument(
        "--usage-interval",
        type=float,
        default=15.0,
        help="seconds between usage scrapes of each running sandbox's agent (0 = off)",
    )
    run.add_argument("--usage-concurrency", type=int, default=32, help="agent scrapes in flight at once")
    run.add_argument(
        "--usage-status-interval",
        type=float,
        default=60.0,
        help="minimum seconds between status.usage writes per sandbox",
    )
    run.add_argument("--agent-port", type=int, default=ENVD_PORT, help="the agent's envd port in sandbox pods")
    run.add_argument(
        "--egress-cluster-cidr",
        dest="egress_cluster_cidrs",
        action="append",
        default=[],
        metavar="CIDR",
        help="the cluster's pod/service/node range that egress 'allow' excludes (repeat; default: every "
        "private range, " + ", ".join(DEFAULT_CLUSTER_CIDRS) + ")",
    )
    run.add_argument(
        "--dns-namespace",
        default=DEFAULT_DNS_NAMESPACE,
        help="namespace of the cluster DNS pods every sandbox's egress reaches (default: %(default)s)",
    )
    run.add_argument(
        "--dns-pod-label",
        dest="dns_pod_labels",
        action="append",
        default=[],
        type=_label,
        metavar="KEY=VALUE",
        help="a label of the cluster DNS pods (repeat; default: "
        + ",".join(f"{k}={v}" for k, v in DEFAULT_DNS_POD_LABELS)
        + ")",
    )
    run.add_argument(
        "--token-key-file",
        default=None,
        help="file with the key agent access tokens derive from, the gateway's (else $SANDBOX_GATEWAY_TOKEN_KEY)",
    )
    run.add_argument(
        "--metric-metadata-key",
        action="append",
        default=[],
        dest="metric_metadata_keys",
        help="a spec.metadata key exported as a metric label (repeatable; keep the set small)",
    )
    election = run.add_argument_group("leader election (for more than one replica)")
    election.add_argument(
        "--leader-election", action="store_true", help="act only while holding a Lease; other replicas stand by"
    )
    election.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE", "sandbox-system"),
        help="namespace of the Lease (default: $POD_NAMESPACE, else sandbox-system)",
    )
    election.add_argument("--leader-election-name", default="sandbox-operator", help="name of the Lease")
    election.add_argument(
        "--leader-election-identity",
        default=None,
        help="this replica's holder identity (default: $POD_NAME, else the host name, plus a random suffix)",
    )
    election.add_argument("--lease-duration", type=float, default=15.0, help="seconds a Lease holds unrenewed")
    election.add_argument(
        "--lease-renew-deadline", type=float, default=10.0, help="seconds a leader may fail to renew before it stops"
    )
    election.add_argument("--lease-retry-period", type=float, default=2.0, help="seconds between Lease renewals/looks")
    gateway = sub.add_parser("gateway", help="serve the E2B control-plane API and the sandbox data-plane proxy")
    gateway.add_argument("--kubeconfig", default=None, help="kubeconfig path (default: in-cluster, else KUBECONFIG)")
    gateway.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    gateway.add_argument("--bind-address", default="0.0.0.0", help="address of the API/proxy and metrics ports")
    gateway.add_argument("--port", type=int, default=3000, help="E2B API and data-plane proxy port")
    gateway.add_argument("--metrics-port", type=int, default=9091, help="Prometheus /metrics port (0 = off)")
    gateway.add_argument(
        "--keys-namespace",
        default="sandbox-system",
        help="namespace of the API key Secrets (label sandbox.dev/api-key=true)",
    )
    gateway.add_argument(
        "--domain",
        default=None,
        help="sandbox domain returned to SDKs ({port}-{id}.<domain> routes here); unset: clients use E2B_SANDBOX_URL",
    )
    gateway.add_argument(
        "--token-key-file",
        default=None,
        help="file with the key sandbox access tokens derive from (else $SANDBOX_GATEWAY_TOKEN_KEY)",
    )
    gateway.add_argument(
        "--create-timeout", type=float, default=120.0, help="seconds a create or resume waits for the sandbox to serve"
    )
    gateway.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds from a request's first byte to its last header"
    )
    gateway.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a request body may stall before the client gets 408"
    )
    gateway.add_argument(
        "--keepalive-timeout", type=float, default=30.0, help="seconds an idle connection stays open between requests"
    )
    gateway.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=256,
        help="open connections per client IP (more get 429; 0 = no cap; behind a proxy all share its IP)",
    )
    session = gateway.add_argument_group("session API (docs/gateway.md)")
    session.add_argument(
        "--session-execution-timeout", type=int, default=300, help="seconds one session execute or install may run"
    )
    session.add_argument(
        "--session-idle-timeout", type=int, default=1800, help="seconds a session sandbox may idle before it suspends"
    )
    session.add_argument(
        "--session-max-lifetime", type=int, default=3600, help="seconds a session sandbox lives at most"
    )
    session.add_argument(
        "--session-code-interpreter-template",
        default="code-interpreter",
        help="the SandboxTemplate of sandbox_type code_interpreter",
    )
    session.add_argument(
        "--session-custom-template", default="base", help="the template of sandbox_type custom without a template_id"
    )
    session.add_argument(
        "--session-anonymous-namespace",
        default=None,
        help="serve session calls without X-API-KEY in this namespace (off by default: only for a front end's "
        "private network)",
    )
    key = sub.add_parser("api-key", help="print a new gateway API key as a Secret manifest (kubectl apply -f -)")
    key.add_argument("--grants", required=True, help="the namespace whose sandboxes the key may use")
    key.add_argument("--keys-namespace", default="sandbox-system", help="the gateway's namespace (--keys-namespace)")
    key.add_argument("--name", default=None, help="Secret name (default: api-key-<grants>-<random>)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "INFO")),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    if args.command == "run" and args.log_level != "DEBUG":
        # kopf logs every handler run at INFO ("Handler ... succeeded"): one line per watch event of
        # every kind, which costs more CPU than the handler itself in a burst. Transitions are ours.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.command == "run":
        from sandbox_operator.controller.config import OperatorConfig
        from sandbox_operator.controller.main import run_operator
        from sandbox_operator.lifecycle.lease import LeaseTimings

        try:
            timings = LeaseTimings(args.lease_duration, args.lease_renew_deadline, args.lease_retry_period)
        except ValueError as exc:
            raise SystemExit(f"sandbox-operator run: {exc}") from None
        # Unique per process: a restarted pod (same name) must not renew its predecessor's holding.
        identity = args.leader_election_identity or (
            f"{os.environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(4)}"
        )
        config = OperatorConfig(
            namespaces=tuple(args.namespaces),
            kubeconfig=args.kubeconfig,
            bind_address=args.bind_address,
            metrics_port=args.metrics_port,
            liveness_port=args.liveness_port,
            workers=args.workers,
            max_in_flight=args.max_in_flight,
            gateway_namespace=args.gateway_namespace,
            normal_events=args.normal_events == "on",
            usage_interval=args.usage_interval,
            usage_concurrency=args.usage_concurrency,
            usage_status_interval=args.usage_status_interval,
            agent_port=args.agent_port,
            metric_metadata_keys=tuple(args.metric_metadata_keys),
            agent_token_key=read_token_key(args.token_key_file),
            egress_cluster_cidrs=tuple(args.egress_cluster_cidrs) or DEFAULT_CLUSTER_CIDRS,
            dns_namespace=args.dns_namespace,
            dns_pod_labels=tuple(args.dns_pod_labels) or DEFAULT_DNS_POD_LABELS,
            leader_election=args.leader_election,
            leader_election_namespace=args.leader_election_namespace,
            leader_election_name=args.leader_election_name,
            leader_identity=identity,
            lease_timings=timings,
        )
        if config.agent_token_key is None:
            logging.getLogger("sandbox_operator").warning(
                "no --token-key-file or %s: sandbox agents start without an access token; anything that "
                "reaches a pod's IP can drive its agent (development only)",
                TOKEN_KEY_ENV,
            )
        sys.exit(run_operator(config))
    if args.command == "api-key":
        import json

        from sandbox_operator.gateway.e2b import api_key_secret, new_api_key

        api_key = new_api_key()
        name = args.name or f"api-key-{args.grants}-{secrets.token_hex(3)}"[:63]
        print(
            json.dumps(api_key_secret(name, api_key, keys_namespace=args.keys_namespace, grants=args.grants), indent=2)
        )
        print(f"E2B_API_KEY={api_key}", file=sys.stderr)
        return
    if args.command == "gateway":
        from sandbox_operator.gateway.listener import ListenerLimits
        from sandbox_operator.gateway.main import run_gateway
        from sandbox_operator.gateway.session_logic import SessionLimits

        try:
            session_limits = SessionLimits(
                execution_s=args.session_execution_timeout,
                idle_s=args.session_idle_timeout,
                lifetime_s=args.session_max_lifetime,
                code_interpreter_template=args.session_code_interpreter_template,
                custom_template=args.session_custom_template,
                anonymous_namespace=args.session_anonymous_namespace,
            )
        except ValueError as exc:
            raise SystemExit(f"sandbox-operator gateway: {exc}") from None
        sys.exit(
            run_gateway(
                kubeconfig=args.kubeconfig,
                host=args.bind_address,
                port=args.port,
                metrics_port=args.metrics_port,
                keys_namespace=args.keys_namespace,
                domain=args.domain,
                token_key_file=args.token_key_file,
                create_timeout=args.create_timeout,
                body_timeout=args.body_timeout,
                session=session_limits,
                limits=ListenerLimits(
                    header_timeout=args.header_timeout,
                    keepalive_timeout=args.keepalive_timeout,
                    max_connections_per_ip=args.max_connections_per_ip,
                ),
            )
        )


if __name__ == "__main__":
    main()
