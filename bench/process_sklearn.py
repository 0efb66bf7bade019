"""Start-up and exit of a stage process: transformers importing scikit-learn vs `phiops.procs.skip_sklearn`.

Run:  /work/main/.venv/bin/python bench/process_sklearn.py --rounds 8 --out bench/results/process_sklearn_cpu_run1.json

transformers 5.17 imports sklearn (and scipy) in any process that loads a model or a tokenizer,
through transformers.generation.candidate_generator. This times a fresh interpreter doing what a
stage does before its first line of work, as `phiops.cli.main` sets it up (`lean_gc` on both
sides), with and without `skip_sklearn()`, for two stacks: a model stage's (torch, peft,
transformers, a model built; peft imports scipy itself) and format's (a tokenizer class only).
The sides alternate round by round, so the shared machine's load falls on both alike; medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _common import machine, run_process, versions

STACKS = {
    "model": (
        "import sys, torch, peft\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "AutoModelForCausalLM.from_config(AutoConfig.for_model('llama', vocab_size=64, hidden_size=16,"
        " intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
    ),
    "tokenizer": "import sys\nfrom transformers import AutoTokenizer\n",
}
SETUP = {
    "sklearn": "from phiops import procs\nprocs.lean_gc()\n",
    "skip_sklearn": "from phiops import procs\nprocs.lean_gc()\nprocs.skip_sklearn()\n",
}
CHECK = "assert ('sklearn' in sys.modules) == {loaded}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    codes = {(stack, side): SETUP[side] + STACKS[stack] + CHECK.format(loaded=side == "sklearn")
             for stack in STACKS for side in SETUP}
    for code in codes.values():  # untimed: page cache and .pyc warm for all
        run_process(code)
    runs = {f"{stack}/{side}": {"wall_s": [], "cpu_s": []} for stack, side in codes}
    for r in range(args.rounds):
        for stack in STACKS:
            for side in (list(SETUP) if r % 2 == 0 else list(reversed(SETUP))):
                wall, cpu = run_process(codes[stack, side])
                runs[f"{stack}/{side}"]["wall_s"].append(round(wall, 2))
                runs[f"{stack}/{side}"]["cpu_s"].append(round(cpu, 2))
        print(r, {k: v["wall_s"][-1] for k, v in runs.items()}, flush=True)

    med = {k: {m: round(statistics.median(v), 2) for m, v in d.items()} for k, d in runs.items()}
    saved = {stack: {m: round(med[f"{stack}/sklearn"][m] - med[f"{stack}/skip_sklearn"][m], 2)
                     for m in ("wall_s", "cpu_s")} for stack in STACKS}
    result = {
        "what": "a fresh interpreter set up as phiops.cli.main does, importing a stage's stack, then exiting",
        "machine": machine(),
        "versions": versions(("torch", "transformers", "peft", "scikit-learn", "scipy")),
        "rounds": args.rounds,
        "runs": runs,
        "median": med,
        "saved_median_s": saved,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "saved_median_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
