"""`omni-runtime <role>`: the entrypoint of every runtime container.

    omni-runtime thinker [--engine vllm|transformers]
    omni-runtime talker
    omni-runtime gateway
    omni-runtime print-vllm-command      (what the thinker would run, for debugging)
    omni-runtime make-tiny-model DIR     (tiny random-weight checkpoint for CPU dev/tests)
    omni-runtime fetch-weights           (copy the model repository onto the weights volume: the loader Job)

Configuration comes from OMNI_* environment variables (see runtime/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from omni_runtime.config import ConfigError, Env, GatewaySettings, LauncherSettings, TalkerSettings, ThinkerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni-runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    th = sub.add_parser("thinker", help="run the thinker (vLLM by default)")
    th.add_argument("--engine", choices=("vllm", "transformers"),
                    default=os.environ.get(Env.THINKER_ENGINE, "vllm"))
    sub.add_parser("talker", help="run the talker speech server")
    sub.add_parser("gateway", help="run the OpenAI-compatible gateway")
    sub.add_parser("print-vllm-command", help="print the vllm serve command the thinker would run")
    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight Qwen3-Omni checkpoint")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    sub.add_parser("fetch-weights", help="copy OMNI_MODEL at OMNI_MODEL_REVISION from the hub into OMNI_WEIGHTS_DIR/model")
    parser.add_argument("--log-level", default=os.environ.get(Env.LOG_LEVEL, "INFO"))
    args = parser.parse_args(argv)

    from omni_runtime.server import setup_logging

    setup_logging(args.log_level)
    role = args.role
    if role in ("thinker", "talker", "gateway"):
        declared = os.environ.get(Env.ROLE)
        if declared and declared != role:
            print(f"omni-runtime: OMNI_ROLE={declared} but the command runs {role}", file=sys.stderr)
            return 2
    try:
        if role == "thinker" and args.engine == "vllm":
            from omni_runtime.thinker import vllm_launcher

            return vllm_launcher.run()
        if role == "thinker":
            from omni_runtime.thinker import transformers_server

            return asyncio.run(transformers_server.amain(ThinkerSettings.from_env()))
        if role == "talker":
            from omni_runtime.talker import server

            return asyncio.run(server.amain(TalkerSettings.from_env()))
        if role == "gateway":
            from omni_runtime import gateway

            return asyncio.run(gateway.amain(GatewaySettings.from_env()))
        if role == "print-vllm-command":
            from omni_runtime.thinker import vllm_launcher

            argv_, facts = vllm_launcher.build_vllm_command(LauncherSettings.from_env())
            print(json.dumps({"argv": argv_, **facts}, indent=2))
            return 0
        if role == "fetch-weights":
            from omni_runtime.loader import fetch

            return fetch.run()
        if role == "make-tiny-model":
            from omni_runtime.tiny import build_tiny_model

            print(build_tiny_model(args.out_dir, seed=args.seed))
            return 0
    except ConfigError as exc:
        print(f"omni-runtime {role}: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
