"""Evaluate a linear_moe checkpoint with lm-evaluation-harness (``pip install -e .[eval]``).

    python eval/run_lm_eval.py --load checkpoints/run --tasks linear_moe_tiny_mc \
        --output results.json
    python eval/run_lm_eval.py --load checkpoints/run --tasks hellaswag,lambada_openai

--load is the training run's --save directory (latest iteration unless --iteration); the model
is rebuilt from the arguments saved in the checkpoint, on one process (any TP/PP/EP layout
loads). Tasks are lm-eval's (fetched from the HF hub) or YAML tasks under --include-path, by
default eval/tasks/ (offline: linear_moe_tiny_mc, linear_moe_tiny_ppl, linear_moe_tiny_gen).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="the training run's --save directory")
    parser.add_argument("--iteration", type=int, help="default: the latest saved")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", default=os.path.join(HERE, "tasks"),
                        help="a directory of extra YAML tasks (default: eval/tasks)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--limit", type=float, help="examples per task (or a fraction)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer-model", help="HF tokenizer directory (default: the run's)")
    parser.add_argument("--device", help="default: cuda if present, else cpu")
    parser.add_argument("--output", help="write the results (metrics per task) as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"--include-path {args.include_path!r} is not a directory")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise SystemExit(f"lm-eval is not installed ({exc}); pip install -e '.[eval]'")
    from lm_eval_adapter import LinearMoELM

    tasks = [t for t in args.tasks.split(",") if t]
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:  # before the model is loaded
        raise SystemExit(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm_eval --tasks "
                         f"list` or the YAML files under {args.include_path}")
    lm = LinearMoELM.from_checkpoint(args.load, args.iteration, args.tokenizer_model,
                                     args.batch_size, args.device)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot,
                                      limit=args.limit, task_manager=manager)
    summary = {"load": os.path.abspath(args.load), "iteration": args.iteration,
               "results": results["results"]}
    print(json.dumps(summary["results"], indent=1, default=str))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return summary


if __name__ == "__main__":
    main()
