"""Command line: argument parsing only. Every user mistake ends as one `error: ...` line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

QUICKSTART = Path(__file__).parents[1] / "quickstart.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignment", description="Staged RLHF pipelines (SFT -> RM -> PPO/DPO).")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline YAML (finished, unchanged stages are skipped)")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. name=exp2 stages.0.epochs=2")

    validate = sub.add_parser("validate", help="report every problem in a pipeline YAML without loading a model")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*")

    quick = sub.add_parser("quickstart", help="run the embedded default chain on the toy model (run name `quickstart`)")
    quick.add_argument("overrides", nargs="*")

    sub.add_parser("stages", help="list stage kinds and their config fields")

    methods = sub.add_parser("methods", help="the fine-tuning methods for a config's model: trainable parameters, "
                             "stages, PPO rollout path, memory")
    methods.add_argument("config", nargs="?", help="a pipeline YAML (default: the toy model)")
    methods.add_argument("overrides", nargs="*")

    report = sub.add_parser("report", help="write report.md, report.html and plots/ into a run folder")
    report.add_argument("run_dir")

    export = sub.add_parser("export", help="the final policy of a run: its peft adapter folder, or merged (--merge)")
    export.add_argument("run_dir")
    export.add_argument("--merge", metavar="OUT", help="write a plain transformers model folder (base + adapter merged)")
    export.add_argument("--out", help="copy the adapter folder here (without --merge)")

    gen = sub.add_parser("generate", help="sample from a run's final policy (or a model); no --prompt: read stdin")
    gen.add_argument("source", help="a run folder (runs/<name>) or a model folder / hub id")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--engine", choices=("hf", "vllm"), default="hf")

    evaluate = sub.add_parser("eval", help="evaluate artifacts")
    what = evaluate.add_subparsers(dest="what", required=True)
    pairs = what.add_parser("pairs", help="pairwise accuracy of a reward model on preference pairs")
    pairs.add_argument("--reward", required=True, help="a reward model folder (e.g. runs/reward/1-reward/reward_model)")
    pairs.add_argument("--data", required=True, help="pairs: prompt/chosen/rejected jsonl/json/csv/parquet, toy:...")
    pairs.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    pairs.add_argument("--batch-size", type=int, default=64)
    pol = what.add_parser("policy", help="a policy (run folder, exported model or model id) on chosen measures")
    pol.add_argument("source", help="a run folder (its final policy), a model folder or a hub id")
    pol.add_argument("--reward", help="reward model folder: mean reward of the policy's greedy answers")
    pol.add_argument("--prompts", help="prompts for --reward/--against (default on the toy: the gold evaluator's)")
    pol.add_argument("--against", help="another policy (same forms as SOURCE): win rate of SOURCE against it")
    pol.add_argument("--perplexity", help="a UTF-8 text file: perplexity over its lines")
    pol.add_argument("--tasks", nargs="+", help="classification data (toy:task/<name> or files): accuracy")
    pol.add_argument("--gold", action="store_true", help="also run the toy gold evaluator (automatic for `toy` runs)")
    pol.add_argument("--max-new-tokens", type=int, default=24)
    pol.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    bench = sub.add_parser("bench", help="benchmarks: JSON, markdown table and PNG chart into --out (docs/benchmarks.md)")
    bench.add_argument("what", choices=("rollout", "sync", "ppo", "memory", "compare-trl", "toy"))
    bench.add_argument("--out", required=True, help="folder for <what>.json, <what>.md, <what>.png (and run folders)")
    bench.add_argument("--size", default="76m", help="random Llama built locally: tiny | 76m | 0.5b (default 76m)")
    bench.add_argument("--repeats", type=int, default=3, help="measured repeats (PPO/TRL: iterations after a warm-up)")
    bench.add_argument("--threads", type=int, default=0, help="cores for torch and vLLM (default: every free core)")
    bench.add_argument("--batches", default="8,32,64", help="rollout: batch sizes")
    bench.add_argument("--batch", type=int, default=64, help="sync/ppo/memory: prompts per generation; compare-trl: completions per step (16 prompts x 4)")
    bench.add_argument("--new-tokens", type=int, help="max new tokens (rollout/ppo/memory 128, sync/compare-trl 64)")
    bench.add_argument("--ranks", default="8,16,64", help="sync: LoRA ranks")
    bench.add_argument("--engines", help="rollout, ppo: hf,vllm-merged,vllm-lora; sync: vllm-lora,vllm-merged; "
                       "compare-trl: vllm (default),hf")
    bench.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bf16 on a GPU) | float32 | bfloat16")
    bench.add_argument("--runs", help="memory: runs to measure (default imports,sft,ppo-hf,ppo-vllm,four-copies); "
                       "toy: sft,reward,ppo,dpo,continual (default all)")
    bench.add_argument("--worlds", default="0,1,2,3,4", help="toy: the worlds, one table row each (default 0,1,2,3,4)")
    bench.add_argument("--seeds", default="0", help="toy: training seeds, one row per world and seed (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from alignment.quiet import quiet_console

    quiet_console()  # our lines and real warnings on the console; dependencies' noise only in the run's log.txt
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from alignment.errors import UserError

    try:
        return _dispatch(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from alignment.errors import UserError

    if args.command == "stages":
        from rich.console import Console

        from alignment.registry import describe_stages

        console = Console(highlight=False)
        for kind, doc, fields in describe_stages():
            console.print(f"[bold]{kind}[/bold]: {doc}")
            for name, spec in fields.items():
                console.print(f"    {name}: {spec}")
        return 0
    if args.command == "validate":
        from alignment.config import load_config

        config, warnings = load_config(args.config, args.overrides)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{args.config}: ok ({len(config.stages)} stages: {' -> '.join(s.kind for s in config.stages)})")
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "methods":
        return _methods(args)
    if args.command == "report":
        from alignment.report import write_report

        print(write_report(Path(args.run_dir)))
        return 0
    if args.command == "export":
        from alignment.export import export

        if bool(args.merge) == bool(args.out):
            raise UserError("export: give exactly one of --merge OUT (merged model) or --out DIR (adapter folder)")
        print(export(Path(args.run_dir), Path(args.merge or args.out), merge=bool(args.merge)))
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        from alignment.bench import Options, run_benchmark

        fields = ("size", "repeats", "threads", "batches", "batch", "new_tokens", "ranks", "engines", "runs", "dtype", "worlds", "seeds")
        for path in run_benchmark(args.what, Options(Path(args.out), **{f: getattr(args, f) for f in fields})):
            print(path)
        return 0
    from alignment.pipeline import Pipeline

    if args.command == "quickstart":
        Pipeline.from_yaml(QUICKSTART, args.overrides).run()
        return 0
    if args.command == "run":
        Pipeline.from_yaml(args.config, args.overrides).run()
        return 0
    raise AssertionError(args.command)


def _methods(args) -> int:
    from rich.console import Console

    from alignment.methods import catalogue, markdown_table
    from alignment.policy import resolve_model_path

    model, configured = "toy", None
    if args.config:
        from alignment.config import load_config

        config, _ = load_config(args.config, args.overrides)
        model, configured = config.model, config.adapter
    with Console(stderr=True).status(f"counting parameters of {model!r} (meta device, no weights loaded)"):
        rows = catalogue(resolve_model_path(model), configured)
    print(f"model {model}: {rows[0]['total']:,} parameters")
    print(markdown_table(rows))  # plain print: a markdown table must not be wrapped
    return 0


def _generate(args) -> int:
    from alignment.export import Generator

    generator = Generator(args.source, args.engine)
    try:
        if args.prompt:
            for text in generator(args.prompt, args.max_new_tokens, args.temperature):
                print(text.strip())
            return 0
        for line in sys.stdin:  # interactive: one prompt per line until EOF (Ctrl-D)
            if line.strip():
                print(generator([line.rstrip("\n")], args.max_new_tokens, args.temperature)[0].strip(), flush=True)
        return 0
    finally:
        generator.close()


def _eval(args) -> int:
    from reward_models.evaluate import eval_pairs_command, eval_policy_command  # the app layer may import it

    return eval_pairs_command(args) if args.what == "pairs" else eval_policy_command(args)
