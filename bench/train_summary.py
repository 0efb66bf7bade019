"""Print the train benchmark results as a table: `python bench/train_summary.py RESULT.json...`."""

import json
import sys

for path in sys.argv[1:]:
    d = json.load(open(path))
    print(f"== {path.rsplit('/', 1)[-1]}  {d['machine'].get('gpu')}  {d['data_and_model']}")
    for name, v in d["variants"].items():
        if "error" in v:
            print(f"{name:16s} ERROR {v['error'][-600:]}")
            continue
        print(f"{name:16s} tok/s {v['steady']['tokens_per_s']:9.1f}  peak {v.get('peak_gpu_memory_bytes', 0) / 1e9:6.2f} GB"
              f"  eval_loss {v['report'].get('eval_loss')}  mfu6n {v['mfu_6n']}  s/step {v['steady']['seconds_per_step']}"
              f"  wall {v['wall_seconds']} s")
    for key in ("vs_seed", "ddp2_scaling"):
        if d.get(key) is not None:
            print(key, json.dumps(d[key]))
