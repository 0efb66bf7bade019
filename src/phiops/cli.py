"""The `phiops` command: it parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from phiops import config
from phiops.approval import ApprovalError
from phiops.bento import BentoError
from phiops.data import DataError
from phiops.artifacts import RegistryError
from phiops.paths import Layout

STAGES = ("validate", "format", "train", "merge", "quantize", "evaluate")
EXIT_CONFIG = 2  # bad params: nothing ran
EXIT_DATA = 3  # validate or format refused the data; the message names every row and rule
EXIT_REFUSED = 4  # the registry, Prefect or BentoML refused (tampered files, unknown version, auth)


def _load(args: argparse.Namespace) -> config.Params:
    cfg = config.load(args.params)
    logging.getLogger("phiops").info("resolved config: %s", json.dumps(cfg.dump(), sort_keys=True))
    return cfg


def cmd_stage(args: argparse.Namespace) -> int:
    import importlib

    cfg = _load(args)
    layout = Layout(Path(args.root))
    mod = importlib.import_module(f"phiops.stages.{args.name}")
    if args.name == "validate":
        for given in (cfg.data.raw, cfg.data.test):
            if given is not None and not (layout.root / given).resolve().is_relative_to((layout.root / "data/raw").resolve()):
                logging.getLogger("phiops").warning(
                    "%s is outside data/raw/: dvc.yaml tracks data/raw, so DVC will not see it change", given)
    if args.name == "quantize":
        if not args.method:
            raise SystemExit("phiops stage quantize needs --method gptq|awq")
        out = mod.run(cfg, layout, args.method)
    else:
        out = mod.run(cfg, layout)
    print(f"stage {args.name}: done -> {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config.load(args.params)  # fail fast, before Prefect starts, on a bad config
    sys.path.insert(0, str(Path(args.root).resolve()))
    from flows.retrain import retrain

    result = retrain(root=str(Path(args.root).resolve()), params=str(args.params), ask=args.ask)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("status") in ("promoted", "unchanged") else 1


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = config.load(args.file)
    print(f"{args.file}: valid")
    if args.show:
        print(json.dumps(cfg.dump(), indent=2))
    return 0


def cmd_config_use(args: argparse.Namespace) -> int:
    src = Path(args.root) / "configs" / f"{args.preset}.yaml"
    config.load(src)
    Path(args.params).write_text(src.read_text())
    print(f"{args.params} <- {src}")
    return 0


def cmd_model_fetch(args: argparse.Namespace) -> int:
    from phiops import models

    print(models.ensure_builtin())
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    from phiops import datagen

    n = datagen.write(Path(args.out), n=args.n, seed=args.seed)
    print(f"wrote {n} rows to {args.out}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from phiops import gate, registry
    from phiops.stages import evaluate

    cfg = _load(args)
    layout = Layout(Path(args.root))
    prod = registry.Registry(layout, cfg.registry.artifact).production()
    prod_eval = evaluate.production(cfg, layout, prod) if prod is not None else None
    report = json.loads(layout.eval_report.read_text())
    decision = gate.decide(cfg.gate, report, evaluate.load_scores(layout), prod_eval)
    gate.write(layout.gate_report, decision)
    print(gate.explain(decision))
    return 0 if decision.passed else 1


def cmd_registry(args: argparse.Namespace) -> int:
    from phiops import registry, registry_view

    cfg = _load(args)
    reg = registry.Registry(Layout(Path(args.root)), cfg.registry.artifact)
    prod = reg.production()
    if args.action == "show":
        rec = reg.record(args.version) if args.version else prod
        if rec is None:
            print(f"{cfg.registry.artifact}: nothing in production yet (`phiops registry history` lists versions)")
            return 1
        print(json.dumps(rec, indent=2) if args.json else registry_view.render_record(rec))
        return 0
    history = reg.history()
    if args.json:
        print(json.dumps({"versions": history, "promotions": reg.promotions()}, indent=2))
        return 0
    print(f"{cfg.registry.artifact}: versions (* = production)")
    print(registry_view.render_table(history, production=prod["version"] if prod else None))
    print("\nproduction assignments (promotions and rollbacks)")
    print(registry_view.render_promotions(reg.promotions()))
    return 0


def _promote(args: argparse.Namespace, version: str) -> int:
    from phiops import approval, deploy

    cfg = _load(args)
    out = deploy.promote(Layout(Path(args.root)), cfg, version, approver=args.approver or approval.default_approver(),
                         reason=args.reason, bento_build=not args.no_bento)
    if out["changed"]:
        print(f"production: {out['previous'] or 'none'} -> {version}")
    else:
        print(f"production: already {version} (nothing recorded)")
    if "bento" in out:
        print(f"bento {out['bento']} (model {out['model']}, files from {out['source']})")
        print(f"containerize (needs a Docker engine): {out['containerize']}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    return _promote(args, args.version)


def cmd_rollback(args: argparse.Namespace) -> int:
    from phiops import registry

    cfg = _load(args)
    reg = registry.Registry(Layout(Path(args.root)), cfg.registry.artifact)
    if args.to:
        return _promote(args, args.to)
    prev = reg.previous_production()
    if prev is None:
        print("error: no earlier production version to roll back to (`phiops registry history`)", file=sys.stderr)
        return 1
    return _promote(args, prev["version"])


def cmd_approvals(args: argparse.Namespace) -> int:
    from phiops import approval

    cfg = _load(args)
    for d in approval.reconcile(Layout(Path(args.root)), cfg.registry.artifact):
        print(f"{d['version']}: rejected by {d['approver']} ({d['reason']})")
    runs = approval.pending()
    if not runs:
        print("no flow run is waiting for an approval")
        return 0
    for r in runs:
        print(f"{r['id']}  {r['name']}  {r['state']} since {r['since']}  (times out {r['timeout'] or 'never'})")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from phiops import approval

    out = approval.decide(args.run_id, approve=args.command == "approve", reason=args.reason,
                          approver=args.approver or approval.default_approver())
    print(f"flow run {out['id']} ({out['name']}): {out['decision']}; it resumes now")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from phiops import bento, registry

    cfg = _load(args)
    reg = registry.Registry(Layout(Path(args.root)), cfg.registry.artifact)
    prod = reg.production()
    if prod is None or not prod.get("bento"):
        print("no production model with a bento yet: run `phiops run` first", file=sys.stderr)
        return 1
    print(bento.ask(prod["bento"], args.prompt, port=args.port))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phiops",
        description="Fine-tune, quantize, gate, approve and serve Phi-family models (each command has --help).",
    )
    p.add_argument("--params", default="params.yaml", help="config file (default: %(default)s)")
    p.add_argument("--root", default=".", help="project root holding dvc.yaml (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="run the retraining chain (Prefect flow over the DVC stages)")
    s.add_argument("--ask", default=None, help="after promotion, ask the served model this and print the answer")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    s.add_argument("name", choices=STAGES)
    s.add_argument("--method", choices=("gptq", "awq"), help="quantization method (stage quantize)")
    s.set_defaults(fn=cmd_stage)

    s = sub.add_parser("config", help="check a params file or switch to a preset")
    csub = s.add_subparsers(dest="action", required=True)
    c = csub.add_parser("check", help="validate a params file; lists every invalid key")
    c.add_argument("file", nargs="?", default="params.yaml")
    c.add_argument("--show", action="store_true", help="print the resolved config")
    c.set_defaults(fn=cmd_config_check)
    c = csub.add_parser("use", help="copy configs/<preset>.yaml to params.yaml")
    c.add_argument("preset")
    c.set_defaults(fn=cmd_config_use)

    s = sub.add_parser("model", help="the embedded default model")
    msub = s.add_subparsers(dest="action", required=True)
    m = msub.add_parser("fetch", help="download and convert SmolLM2-135M-Instruct to safetensors (cached)")
    m.set_defaults(fn=cmd_model_fetch)

    s = sub.add_parser("data", help="sample data")
    dsub = s.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("generate", help="write the deterministic support-ticket dataset")
    d.add_argument("--out", default="data/raw/tickets.jsonl")
    d.add_argument("-n", type=int, default=1200)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_data_generate)

    s = sub.add_parser("gate", help="score production, then decide from reports/eval.json whether a candidate may be promoted")
    s.set_defaults(fn=cmd_gate)

    s = sub.add_parser("registry", help="registered versions and their lineage")
    rsub = s.add_subparsers(dest="action", required=True)
    r = rsub.add_parser("show", help="one version's lineage as a table (default: production)")
    r.add_argument("version", nargs="?", default=None)
    r.add_argument("--json", action="store_true", help="the full record (resolved params, eval, gate) as JSON")
    r.set_defaults(fn=cmd_registry)
    r = rsub.add_parser("history", help="every version, then every promotion and rollback")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_registry)

    def deciding(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--reason", required=True, help="why (recorded in the registry)")
        parser.add_argument("--approver", default=None, help="who decides (default: $PHIOPS_APPROVER or user@host)")

    def promoting(parser: argparse.ArgumentParser) -> None:
        deciding(parser)
        parser.add_argument("--no-bento", action="store_true", help="only check the files and assign; build no bento")

    s = sub.add_parser("promote", help="put a registered version in production and build its bento")
    s.add_argument("version")
    promoting(s)
    s.set_defaults(fn=cmd_promote)

    s = sub.add_parser("rollback", help="put the previous production version back (or --to VERSION)")
    s.add_argument("--to", default=None, metavar="VERSION")
    promoting(s)
    s.set_defaults(fn=cmd_rollback)

    s = sub.add_parser("approvals", help="flow runs waiting for a person's decision (needs PREFECT_API_URL)")
    s.set_defaults(fn=cmd_approvals)
    for name, text in (("approve", "approve the candidate of a waiting flow run"),
                       ("reject", "reject the candidate of a waiting flow run")):
        s = sub.add_parser(name, help=text)
        s.add_argument("run_id", help="the flow run id (`phiops approvals`)")
        deciding(s)
        s.set_defaults(fn=cmd_decide)

    s = sub.add_parser("ask", help="serve the production bento, ask one question, print the answer")
    s.add_argument("prompt")
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(fn=cmd_ask)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP call to the local Prefect API drowns the stage logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # GX logs its own import at INFO, a few hundred lines.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (RegistryError, ApprovalError, BentoError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except DataError as exc:
        # Bad data is the user's to fix, not a crash: the message names every row and rule.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA


if __name__ == "__main__":
    sys.exit(main())
