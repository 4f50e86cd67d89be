"""`omni-operator`: size, render, print the CRD, and run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from omni_operator import __version__
from omni_operator.controller.reconciler import PODS_CHECKED_AFTER, RESYNC_SECONDS
from omni_operator.sizing.kv_cache import QWEN3_OMNI_30B_A3B, ModelArchitecture, architecture_from_config
from omni_operator.sizing.replicas import Sizing, SizingRequest, size

EXIT_DOES_NOT_FIT = 2
EXIT_INVALID = 2


def _cmd_size(args: argparse.Namespace) -> int:
    try:
        architecture = _read_architecture(args.model_config) if args.model_config else QWEN3_OMNI_30B_A3B
        result = size(SizingRequest(
            role=args.role, variant=args.variant, video_seconds=args.video_seconds,
            gpu_memory_gib=args.gpu_memory_gib, gpus_per_node=args.gpus_per_node,
            max_nodes_per_replica=args.max_nodes_per_replica, utilization=args.utilization,
            audio_minutes=args.audio_minutes, images_per_prompt=args.images,
            max_num_seqs=args.max_num_seqs if args.max_num_seqs is not None or args.role == "talker" else 8,
            max_model_len=args.max_model_len, architecture=architecture))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if args.output == "json":
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print("\n".join(size_report(result)))
    return 0 if result.fits else EXIT_DOES_NOT_FIT


def _read_architecture(path: str) -> ModelArchitecture:
    """--model-config: a config.json, or the checkpoint directory that holds one."""
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the model config {file}: {err}") from None
    return architecture_from_config(config)


def size_report(result: Sizing) -> list[str]:
    """The text form of `omni-operator size`."""
    status = "fits" if result.fits else "does not fit"
    lines = [f"{result.role} ({result.variant}), {result.video_seconds:g} s video, "
             f"{result.concurrent_sequences} concurrent sequence{'s' if result.concurrent_sequences > 1 else ''} "
             f"x {result.context_tokens} tokens: {result.estimated_gb:.2f} GB estimated -> {status}",
             f"  one request (model card table): {result.table_gb:.2f} GB"]
    if result.graphs_gb:
        lines.append(f"  CUDA graphs (estimate): {result.graphs_gb:.2f} GB")
    more = result.concurrent_sequences - 1
    if more:
        lines.append(f"  KV cache of {more} more sequence{'s' if more > 1 else ''}: "
                     f"{result.concurrent_kv_tokens} tokens x {result.kv_bytes_per_token / 1024:g} KiB per token "
                     f"-> {result.concurrent_kv_gb:.2f} GB")
    lines.append(f"  {result.reason}")
    lines += [f"  note: {note}" for note in result.notes]
    if result.fits:
        lines.append(f"  GPUs per replica: {result.gpus_per_replica} ({result.pods_per_replica} pod(s) x "
                     f"{result.gpus_per_pod}), tensor parallel {result.tensor_parallel_size or '-'}")
        if result.vllm_args:
            lines.append("  vllm serve " + " ".join(_shell_quote(a) for a in result.vllm_args))
    return lines


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _cmd_render(args: argparse.Namespace) -> int:
    from omni_operator.rendering.plan import PlanError, plan_offline

    try:
        docs = list(yaml.safe_load_all(Path(args.file).read_text() if args.file != "-" else sys.stdin.read()))
    except (OSError, yaml.YAMLError) as err:
        print(f"error: cannot read {args.file}: {err}", file=sys.stderr)
        return EXIT_INVALID
    resources = [d for d in docs if isinstance(d, dict) and d.get("kind") == "OmniDeployment"]
    if not resources:
        print(f"error: {args.file} holds no OmniDeployment", file=sys.stderr)
        return EXIT_INVALID
    out: list[dict] = []
    for resource in resources:
        try:
            out += plan_offline(resource, namespace=args.namespace).objects
        except PlanError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INVALID if err.invalid else EXIT_DOES_NOT_FIT
    if args.output == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": out}, indent=2))
    else:
        print(yaml.safe_dump_all(out, sort_keys=False, width=120), end="")
    return 0


def _cmd_crd(_: argparse.Namespace) -> int:
    from omni_operator.api.crd import build_crd, dump_yaml

    print(dump_yaml(build_crd()), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from omni_operator.main import run_operator

    return run_operator(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-operator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("size", help="GPUs and vLLM arguments for one replica, from the model card's table")
    p.add_argument("--role", choices=["thinker", "talker", "combined"], required=True)
    p.add_argument("--variant", choices=["instruct", "thinking", "captioner"], default="instruct")
    p.add_argument("--video-seconds", type=float, default=15.0)
    p.add_argument("--gpu-memory-gib", type=float, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--max-nodes-per-replica", type=int, default=1)
    p.add_argument("--utilization", type=float, default=0.9)
    p.add_argument("--audio-minutes", type=float, default=0.0)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="concurrent sequences per replica (thinker: vLLM --max-num-seqs, default 8; talker: "
                        "maxInflight, default what one GPU holds)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per sequence, tokens (default: derived from video, audio and images)")
    p.add_argument("--model-config", default=None, metavar="PATH",
                   help="config.json (or checkpoint directory) to read layers, KV heads, head dim and dtype from "
                        "(default: Qwen3-Omni-30B-A3B)")
    p.add_argument("--output", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_size)

    p = sub.add_parser("render", help="print the objects the operator would apply for an OmniDeployment file")
    p.add_argument("-f", "--file", required=True, help="YAML file ('-' for stdin)")
    p.add_argument("-n", "--namespace", default=None, help="namespace when the file names none (default: default)")
    p.add_argument("--output", "-o", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("crd", help="print the OmniDeployment CRD")
    p.set_defaults(func=_cmd_crd)

    p = sub.add_parser("run", help="run the operator")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    p.add_argument("--leader-elect", action="store_true", help="only the Lease holder reconciles (replicas > 1)")
    p.add_argument("--leader-election-namespace", default=None, help="default: POD_NAMESPACE or 'default'")
    p.add_argument("--health-port", type=int, default=8080, help="GET /healthz; 0 disables")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics; 0 disables")
    p.add_argument("--image-repository", default=None, help="default repository of the runtime images")
    p.add_argument("--image-tag", default=None, help="default tag of the runtime images")
    p.add_argument("--pods-checked-after", type=float, default=PODS_CHECKED_AFTER, metavar="SECONDS",
                   help="read a role's pods for the reason once it has been short of ready replicas this long")
    p.add_argument("--resync-seconds", type=float, default=RESYNC_SECONDS, metavar="SECONDS",
                   help="reconcile every OmniDeployment this often, whatever the watches say")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
