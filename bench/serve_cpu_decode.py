"""The batching engine's decode on CPU: the cache and attention of `phiops.serve.batched` against
transformers' (``DynamicCache`` + SDPA with ``repeat_kv``), in one run.

Command (about 16 minutes on the 2-core machine):

    python bench/serve_cpu_decode.py --rounds 3 --out bench/results/serve_cpu_decode.json

The embedded default model (SmolLM2-135M-Instruct, `phiops model fetch`) is loaded as the service
and the evaluate stage load it (`phiops.serve.loader.load_checkpoint`, in each dtype asked for),
and the same 64 support-ticket prompts (`phiops.datagen`, seed 7, through the chat template) go
through the engine at once, greedy, 40 new tokens at most, 16 rows at a time: the evaluate stage's
settings. First the decode step alone: 16 rows of those prompts prefilled into one cache per side,
then `--steps` single steps alternating between the sides (`decode_step`, per-step medians), which
the machine's drifting load cannot favour either way. Then whole rounds alternate ``transformers`` (the engine's cache is a plain ``DynamicCache``, the
model on transformers' ``sdpa``: what the engine ran before) and ``phiops`` (the default now), so
other load on the machine hits both alike; each side's best round is reported with their ratio
(`speedup`), and each round's ratio to the baseline round just before it (`round_ratios`).
`answers_differing` counts, per round, the answers that differ from the first baseline round's: in
float32 both sides give the same answers; in bf16 the grouped attention rounds differently from
transformers' expanded one, so a few greedy answers take another token somewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import machine, versions  # the script's own folder (Python puts it on sys.path)

from phiops.serve import batched

NEW_CACHE = batched.new_cache  # the engine's; the baseline side swaps it out
N_PROMPTS, MAX_NEW, BATCH = 64, 40, 16


def _prompts(tok: Any) -> list[list[int]]:
    from phiops import datagen

    texts = [f"{r['instruction']}\n\n{r['input']}" for r in datagen.generate(N_PROMPTS, seed=7)]
    return [list(tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=False), add_special_tokens=False)["input_ids"]) for t in texts]


def _round(model: Any, tok: Any, eos: list[int], prompts: list[list[int]]) -> dict[str, Any]:
    """All prompts through a fresh engine; wall time, tokens, decode steps and the answers."""
    from phiops.serve.engine import Engine, Request

    steps: list[tuple[str, int]] = []
    engine = Engine(model, tok, eos, "cpu", max_batch_size=BATCH, max_wait_ms=10,
                    on_step=lambda phase, rows, new: steps.append((phase, rows)))
    texts: list[list[str]] = [[] for _ in prompts]
    tokens, done, left = [0] * len(prompts), threading.Event(), [len(prompts)]
    lock = threading.Lock()

    def emit(i: int, ev: Any) -> None:
        texts[i].append(ev.text)
        if ev.finish_reason or ev.error:
            tokens[i] = ev.completion_tokens
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(Request(prompt=p, max_new_tokens=MAX_NEW, emit=lambda ev, i=i: emit(i, ev)))
    done.wait()
    wall = time.perf_counter() - t0
    engine.close()
    decode = [rows for phase, rows in steps if phase == "decode"]
    return {"wall_s": round(wall, 2), "completion_tokens": sum(tokens),
            "output_tok_per_s": round(sum(tokens) / wall, 1), "decode_steps": len(decode),
            "mean_decode_rows": round(sum(decode) / max(len(decode), 1), 2),
            "answers": ["".join(t) for t in texts]}


def _steps(model: Any, prompts: list[list[int]], pad: int, n_steps: int) -> dict[str, Any]:
    """One decode step at a time, alternating the two sides (each with its own cache of the same
    16 prompts), so that the machine's load drifts over both alike: per-step medians."""
    import statistics

    import torch

    rows = prompts[:BATCH]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    state: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for side in ("transformers", "phiops"):
            _use(side, model)
            cache = batched.new_cache()
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            state[side] = {"cache": cache, "mask": mask, "pos": mask.sum(-1), "last": out.logits[:, -1].argmax(-1),
                           "ms": []}
        for _ in range(n_steps):
            for side, st in state.items():
                _use(side, model)
                st["mask"] = torch.cat([st["mask"], st["mask"].new_ones((len(rows), 1))], dim=-1)
                t0 = time.perf_counter()
                out = model(input_ids=st["last"][:, None], attention_mask=st["mask"], position_ids=st["pos"][:, None],
                            past_key_values=st["cache"], use_cache=True)
                st["last"] = out.logits[:, -1].argmax(-1)
                st["ms"].append((time.perf_counter() - t0) * 1e3)
                st["pos"] = st["pos"] + 1
    med = {side: round(statistics.median(st["ms"]), 2) for side, st in state.items()}
    return {"rows": len(rows), "cached_tokens": [width, width + n_steps], "steps": n_steps, "median_step_ms": med,
            "speedup": round(med["transformers"] / med["phiops"], 2)}


def _use(side: str, model: Any) -> None:
    """Put the engine and the model on one side's cache and attention."""
    from transformers import DynamicCache

    if side == "transformers":
        model.set_attn_implementation("sdpa")
        batched.new_cache = DynamicCache  # the engine looks it up at each prefill
    else:
        batched.new_cache = NEW_CACHE
        assert batched.use_grouped_decode(model) or model.config._attn_implementation == batched.NAME


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100, help="decode steps per side in the step-by-step part")
    ap.add_argument("--dtypes", default="auto,float32", help="serve.dtype values (auto: bf16 on AMX CPUs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from phiops import models
    from phiops.serve.loader import load_checkpoint

    path = models.ensure_builtin()
    result: dict[str, Any] = {"machine": machine(), "versions": versions(("torch", "transformers")),
                              "threads": torch.get_num_threads(), "prompts": N_PROMPTS, "max_new_tokens": MAX_NEW,
                              "max_batch_size": BATCH, "rounds": args.rounds, "dtypes": {}}
    for setting in args.dtypes.split(","):
        model, tok, eos, _, dtype = load_checkpoint(str(path), setting, "cpu", label="embedded")
        prompts = _prompts(tok)
        runs: dict[str, list[dict[str, Any]]] = {"transformers": [], "phiops": []}
        _round(model, tok, eos, prompts[:BATCH])  # warm-up, uncounted
        steps = _steps(model, prompts, eos[0], args.steps)
        print(setting, dtype, "steps", steps, flush=True)
        for _ in range(args.rounds):
            for side in runs:
                _use(side, model)
                runs[side].append(_round(model, tok, eos, prompts))
                print(setting, dtype, side, {k: v for k, v in runs[side][-1].items() if k != "answers"}, flush=True)
        best = {side: max(r, key=lambda x: x["output_tok_per_s"]) for side, r in runs.items()}
        result["dtypes"][dtype] = {
            "decode_step": steps,
            "rounds": {side: [{k: v for k, v in r.items() if k != "answers"} for r in rs] for side, rs in runs.items()},
            "best_output_tok_per_s": {side: b["output_tok_per_s"] for side, b in best.items()},
            "speedup": round(best["phiops"]["output_tok_per_s"] / best["transformers"]["output_tok_per_s"], 2),
            # each round's phiops over the transformers run just before it (the machine's load drifts)
            "round_ratios": [round(b["output_tok_per_s"] / a["output_tok_per_s"], 2)
                             for a, b in zip(runs["transformers"], runs["phiops"])],
            # Of the 64 answers, how many differ from the first transformers round's, per side and round.
            "answers_differing": {side: [sum(a != b for a, b in zip(r["answers"], runs["transformers"][0]["answers"]))
                                         for r in rs] for side, rs in runs.items()},
        }
        print(dtype, json.dumps({k: v for k, v in result["dtypes"][dtype].items() if k != "rounds"}), flush=True)
        del model
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
