"""The `phiops` command: it parses arguments and calls the library, nothing more.

An expected failure (bad params, bad data, a refusal, a broken model or artifact) prints one
`error: ...` message on stderr and exits with its code; only a bug prints a traceback.

Exit codes (also in `phiops --help`):
  0  done; `phiops run`: promoted, or nothing changed
  1  unexpected crash (a bug): the traceback is printed
  2  usage: unknown command or option, missing argument
  3  config: the params file is invalid (every bad key is listed)
  4  data: validate or format refused the data (every row and rule is named)
  5  refused: the registry or the approval service refused (unknown version, tampered files,
     auth), the registry or a lineage record (dvc.lock, git) could not be read, the gate
     rejected the candidate, the approver refused it, nothing to roll back, no production
     model, another `phiops run` holds this checkout
  6  model or artifact: a checkpoint, quantization, merge check, embedding model, LoRA target,
     bento, image or container (no Docker engine, a failed build, a container that did not
     become ready), DVC stage or the gate's input failed, or an export cannot be made (its
     --out is not empty, the architecture or tokenizer cannot go to GGUF)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from phiops import __version__, config, procs, runlock
from phiops.approval import ApprovalError
from phiops.artifacts import RegistryError
from phiops.bento import BentoError
from phiops.candidate import CandidateError
from phiops.container import ContainerError
from phiops.data import DataError
from phiops.embeddings import EmbeddingError
from phiops.export import ExportError
from phiops.lora import LoraTargetError
from phiops.models import ModelError
from phiops.paths import Layout
from phiops.procs import StageError
from phiops.runlock import RunLockedError
from phiops.stages.merge import MergeMismatchError
from phiops.stages.quantize import QuantizeError

STAGES = ("validate", "format", "train", "merge", "quantize", "evaluate")
# prefect.yaml's deployment runs the same entrypoint: `phiops run` and a scheduled run are one flow.
FLOW_ENTRYPOINT = "flows/retrain.py:retrain"

EXIT_OK = 0
EXIT_CRASH = 1  # what Python exits with on an uncaught exception: kept for bugs
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_CONFIG = 3  # bad params: nothing ran
EXIT_DATA = 4  # validate or format refused the data; the message names every row and rule
EXIT_REFUSED = 5  # a refusal: registry, approval service, gate, approver, nothing to roll back or ask
EXIT_ARTIFACT = 6  # a model or artifact is missing, unsafe or wrong: checkpoint, quantization, merge, bento

# Every phiops error type, by exit code. A subclass takes its base's code (DataValidationError,
# FormatError and procs.DataRefused are DataErrors). tests/unit/test_cli.py checks that every
# `class ...Error` in src/phiops is listed.
ERROR_CODES: tuple[tuple[int, tuple[type[Exception], ...]], ...] = (
    (EXIT_CONFIG, (config.ConfigError,)),
    (EXIT_DATA, (DataError,)),
    (EXIT_REFUSED, (RegistryError, ApprovalError, RunLockedError)),
    (EXIT_ARTIFACT, (ModelError, QuantizeError, MergeMismatchError, EmbeddingError, LoraTargetError, BentoError,
                     ContainerError, StageError, CandidateError, ExportError)),
)
# The table of the module docstring, shown again by `phiops --help`: written once.
_EXIT_TABLE = __doc__.split("Exit codes (also in `phiops --help`):\n", 1)[1]
# `phiops run`'s outcomes (the flow's "status"); an unknown status is a bug, not a success.
RUN_STATUS_CODES = {"promoted": EXIT_OK, "unchanged": EXIT_OK, "rejected": EXIT_REFUSED, "refused": EXIT_REFUSED}


def exit_code(exc: BaseException) -> int | None:
    """The documented exit code of an expected error, or None for anything else (a bug).

    Args:
        exc: the exception a command raised.

    Returns:
        The code from :data:`ERROR_CODES`, or None.
    """
    for code, types in ERROR_CODES:
        if isinstance(exc, types):
            return code
    return None


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace) -> config.Params:
    cfg = config.load(args.params)
    logging.getLogger("phiops").info("resolved config: %s", json.dumps(cfg.dump(), sort_keys=True))
    return cfg


def cmd_stage(args: argparse.Namespace) -> int:
    import importlib

    # Checked before the config loads: a usage error is the command line's fault, exit 2.
    if args.name == "quantize" and not args.method:
        args.usage_error("stage quantize needs --method gptq|awq")
    if args.name != "quantize" and args.method:
        args.usage_error(f"--method applies to stage quantize, not {args.name}")
    cfg = _load(args)
    layout = Layout(Path(args.root))
    mod = importlib.import_module(f"phiops.stages.{args.name}")
    if args.name == "validate":
        for given in (cfg.data.raw, cfg.data.test):
            if given is not None and not (layout.root / given).resolve().is_relative_to((layout.root / "data/raw").resolve()):
                logging.getLogger("phiops").warning(
                    "%s is outside data/raw/: dvc.yaml tracks data/raw, so DVC will not see it change", given)
    if args.name == "quantize":
        out = mod.run(cfg, layout, args.method)
    else:
        out = mod.run(cfg, layout)
    print(f"stage {args.name}: done -> {out}")
    return 0


# Without PREFECT_API_URL, Prefect starts a temporary server per process and gives it 20 s to
# answer; on a loaded 2-core CPU its start (imports, database migration) took longer and the run
# died before its first stage. A slow start is not an error: wait up to 2 minutes unless told.
EPHEMERAL_STARTUP_TIMEOUT_S = "120"


def cmd_run(args: argparse.Namespace) -> int:
    from phiops import prefect_api

    os.environ.setdefault(prefect_api.STARTUP_TIMEOUT_ENV, EPHEMERAL_STARTUP_TIMEOUT_S)
    root = Path(args.root).resolve()
    path, name = FLOW_ENTRYPOINT.split(":")
    if not (root / path).is_file():
        args.usage_error(f"{root} is not a phiops project: it has no {path} (--root names the project)")
    # Fail fast, before Prefect starts, on a bad config or one the DVC stages would not run with.
    config.require_dvc_params(root, args.params)
    runlock.check_free(root)  # another run in this checkout: say so now, not after Prefect starts
    # Without PREFECT_API_URL: the temporary server starts now, while Prefect and the flow import.
    server = prefect_api.start_early()
    try:
        from prefect.flows import load_flow_from_entrypoint

        _quiet_expected_tracebacks()
        saved = list(sys.path)
        try:
            # No placeholder flow: a flow file that does not import is a bug to see, not a no-op run.
            retrain = load_flow_from_entrypoint(f"{root / path}:{name}", use_placeholder_flow=False)
        finally:
            # Prefect leaves the flow's folder and the cwd on sys.path; the flow imports only the
            # installed package, and nothing else in this process should find the project's files.
            sys.path[:] = saved
    except BaseException:
        if server is not None:
            server.stop()
        raise
    with prefect_api.api(server):
        # Absolute: the flow joins params to root; this command read it relative to the cwd.
        result = retrain(root=str(root), params=str(Path(args.params).resolve()), ask=args.ask)
    print(json.dumps(result, indent=2, default=str))
    code = RUN_STATUS_CODES[result["status"]]
    if result["status"] == "rejected":
        return _fail(f"the gate rejected the candidate; production stays {result.get('production') or 'unset'}", code)
    if result["status"] == "refused":
        a = result["approval"]
        return _fail(f"{result['version']} refused by {a['approver']} ({a['reason']})", code)
    return code


class _ExpectedErrorsInOneLine(logging.Filter):
    """Prefect logs a failed task's and flow's exception with its traceback (twice, then again as
    the flow's final state; under load its event worker may log one more while shutting down).
    For an expected error (one with an exit code, anywhere in the exception's chain) the message
    says what to fix and a traceback only buries it; a bug keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        seen = 0
        while exc is not None and seen < 10:
            if exit_code(exc) is not None:
                record.exc_info, record.exc_text = None, None
                break
            exc, seen = exc.__cause__ or exc.__context__, seen + 1
        return True


def _quiet_expected_tracebacks() -> None:
    # On the handlers (a handler's filters see every record it is about to write, from any
    # logger), of the root logger and of Prefect's loggers, which Prefect configured on import.
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                       if name.startswith("prefect")]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, _ExpectedErrorsInOneLine) for f in handler.filters):
                handler.addFilter(_ExpectedErrorsInOneLine())


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


def cmd_sweep(args: argparse.Namespace) -> int:
    import yaml

    from phiops import sweep

    if args.jobs < 1:
        args.usage_error("--jobs must be 1 or more")
    root = Path(args.root)
    params = root / config.DVC_PARAMS  # what the experiments change and the stages read
    config.load(params)
    points = sweep.parse(args.grid, yaml.safe_load(params.read_text(encoding="utf-8")), sweep.dvc_params(root))
    keys = list(points[0])
    print(f"sweep: {len(points)} experiment(s) over {', '.join(keys)}; {args.jobs} at a time", flush=True)
    results = sweep.run(root, points, jobs=args.jobs)
    print(sweep.table(root, keys))
    best = results[0]
    print(f"best: {best.name} ({' '.join(f'{k}={v}' for k, v in best.point.items())}): "
          f"merged task_metric {best.task_metric:.4f}, perplexity {best.perplexity:.4g}")
    if args.apply_best:
        sweep.apply(root, best.name)
        print(f"applied {best.name}: {params.name}, dvc.lock and its outputs are in the workspace "
              f"(`git diff {params.name}`; commit them to keep it)")
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from phiops import candidate, gate

    cfg = _load(args)
    layout = Layout(Path(args.root))
    decision, _ = candidate.evaluate_and_decide(cfg, layout)
    print(gate.explain(decision))
    if not decision.passed:
        return _fail(f"the gate rejected the candidate (reasons above and in {layout.gate_report})", EXIT_REFUSED)
    return EXIT_OK


def cmd_registry(args: argparse.Namespace) -> int:
    from phiops import registry, registry_view

    cfg = _load(args)
    reg = registry.Registry(Layout(Path(args.root)), cfg.registry.artifact)
    prod = reg.production()
    if args.action == "show":
        rec = reg.record(args.version) if args.version else prod
        if rec is None:
            return _fail(f"{cfg.registry.artifact}: nothing in production yet (`phiops registry history` lists versions)",
                         EXIT_REFUSED)
        if args.card:
            print(reg.card(rec["version"]))
        else:
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


def cmd_export(args: argparse.Namespace) -> int:
    from phiops import export

    cfg = _load(args)
    out = export.export(Layout(Path(args.root)), cfg.registry.artifact, args.version, args.format, Path(args.out))
    print(f"{cfg.registry.artifact} {args.version} -> {out['out']} ({args.format}; files from {out['source']})")
    for name, size in out["files"].items():
        print(f"  {size:>13,}  {name}")
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
    if "image" in out:
        _print_image(out["image"])
    elif "bento" in out:
        print(f"its image (needs a Docker engine): {out['containerize']}")
    if "deployed" in out:
        d = out["deployed"]
        print(f"deployed {d['image']} as container {d['name']} at {d['url']} (ready in {d['ready_s']}s)")
    return 0


def _print_image(image: dict) -> None:
    done = f"built in {image['seconds']:.0f}s" if image["built"] else "already built from the same bento"
    print(f"image {image['image']} ({done}, {image['size_bytes'] / 1e9:.2f} GB, base {image['base']})")


def _record(args: argparse.Namespace, cfg: config.Params) -> dict:
    """The record of args.version, or of the production version when none is given."""
    from phiops import registry

    reg = registry.Registry(Layout(Path(args.root)), cfg.registry.artifact)
    if args.version:
        return reg.record(args.version)
    prod = reg.production()
    if prod is None:
        raise RegistryError(f"{cfg.registry.artifact}: nothing in production yet; name a VERSION "
                            "(`phiops registry history`)")
    return prod


def cmd_containerize(args: argparse.Namespace) -> int:
    from phiops import deploy

    cfg = _load(args)
    record = _record(args, cfg)
    if args.plan:
        info = deploy.plan(Layout(Path(args.root)), cfg, record, Path(args.plan), variant=args.variant)
        print(f"{args.plan}/Dockerfile and {args.plan}/build.json: how to build {info['image']} "
              f"(on {info['base_image']}); build it where a Docker engine is with: {info['command']}")
        return 0
    out = deploy.containerize(Layout(Path(args.root)), cfg, record, variant=args.variant, rebuild=args.rebuild)
    print(f"bento {out['bento']} (model {out['model']}, files from {out['source']})")
    _print_image(out["image"])
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from phiops import container, deploy

    if not args.local:
        args.usage_error("only --local is implemented here; on Kubernetes apply infra/k8s/service.yaml (README)")
    cfg = _load(args)
    if args.stop:
        if args.version:
            args.usage_error("--stop takes no VERSION")
        image = container.stop_local(cfg.deploy.name)
        print(f"stopped container {cfg.deploy.name} ({image})" if image else f"no container {cfg.deploy.name} to stop")
        return 0
    out = deploy.deploy_local(Layout(Path(args.root)), cfg, _record(args, cfg))
    was = f", replacing {out['replaced']}" if out["replaced"] else ""
    print(f"deployed {out['image']} as container {out['name']} at {out['url']} (ready in {out['ready_s']}s{was})")
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
        return _fail("no earlier production version to roll back to (`phiops registry history`)", EXIT_REFUSED)
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
    from phiops import registry
    from phiops.serve import client

    cfg = _load(args)
    reg = registry.Registry(Layout(Path(args.root)), cfg.registry.artifact)
    prod = reg.production()
    if prod is None or not prod.get("bento"):
        return _fail("no production model with a bento yet: run `phiops run` first", EXIT_REFUSED)
    # This project's tag, not the record's: a record registered before the store names carried
    # the project (or in a clone elsewhere) names a bento this project never built.
    print(client.ask(registry.bento_tag(reg.root, prod["version"]), args.prompt, port=args.port))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: `phiops [globals] COMMAND [args] [globals]`.

    Returns:
        The parser; each command's namespace carries `fn`, the function that runs it.
    """
    p = argparse.ArgumentParser(
        prog="phiops",
        description="Fine-tune, quantize, gate, approve and serve Phi-family models (each command has --help).",
        epilog="exit codes:\n" + _EXIT_TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the table's lines
    )
    p.add_argument("--version", action="version", version=f"phiops {__version__}")
    p.add_argument("--params", default="params.yaml", help="config file (default: %(default)s)")
    p.add_argument("--root", default=".", help="project root holding dvc.yaml (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    # The same options after the command (`phiops stage train --params x.yaml`). SUPPRESS: a
    # subcommand sets only what it was given, so a value before the command still counts and
    # one after it wins.
    globals_ = argparse.ArgumentParser(add_help=False)
    globals_.add_argument("--params", default=argparse.SUPPRESS, help="config file (as before the command)")
    globals_.add_argument("--root", default=argparse.SUPPRESS, help="project root (as before the command)")
    globals_.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)

    def add(subparsers: argparse._SubParsersAction, name: str, **kw: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[globals_], **kw)

    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = add(sub, "run", help="run the retraining chain (Prefect flow over the DVC stages)")
    s.add_argument("--ask", default=None, help="after promotion, ask the served model this and print the answer")
    s.set_defaults(fn=cmd_run, usage_error=s.error)

    s = add(sub, "stage", help="run one pipeline stage (what dvc.yaml calls)")
    s.add_argument("name", choices=STAGES)
    s.add_argument("--method", choices=("gptq", "awq"), help="quantization method (stage quantize, required there)")
    s.set_defaults(fn=cmd_stage, usage_error=s.error)

    s = add(sub, "config", help="check a params file or switch to a preset")
    csub = s.add_subparsers(dest="action", required=True)
    c = add(csub, "check", help="validate a params file; lists every invalid key")
    c.add_argument("file", nargs="?", default="params.yaml")
    c.add_argument("--show", action="store_true", help="print the resolved config")
    c.set_defaults(fn=cmd_config_check)
    c = add(csub, "use", help="copy configs/<preset>.yaml to params.yaml")
    c.add_argument("preset")
    c.set_defaults(fn=cmd_config_use)

    s = add(sub, "model", help="the embedded default model")
    msub = s.add_subparsers(dest="action", required=True)
    m = add(msub, "fetch", help="download and convert SmolLM2-135M-Instruct to safetensors (cached)")
    m.set_defaults(fn=cmd_model_fetch)

    s = add(sub, "data", help="sample data")
    dsub = s.add_subparsers(dest="action", required=True)
    d = add(dsub, "generate", help="write the deterministic support-ticket dataset")
    d.add_argument("--out", default="data/raw/tickets.jsonl")
    d.add_argument("-n", type=int, default=1200)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_data_generate)

    s = add(sub, "sweep", help="run a grid of params as DVC experiments (validate..evaluate), best first; never promotes")
    s.add_argument("grid", nargs="+", metavar="KEY=V1,V2,...", help="e.g. train.lr=1e-4,3e-4 train.lora.r=8,16")
    s.add_argument("--jobs", type=int, default=1,
                   help="experiments at once (default: %(default)s, one after the other; more: DVC queue workers)")
    s.add_argument("--apply-best", action="store_true", help="put the best point into params.yaml (dvc exp apply)")
    s.set_defaults(fn=cmd_sweep, usage_error=s.error)

    s = add(sub, "gate", help="score production, then decide from reports/eval.json whether a candidate may be promoted")
    s.set_defaults(fn=cmd_gate)

    s = add(sub, "registry", help="registered versions and their lineage")
    rsub = s.add_subparsers(dest="action", required=True)
    r = add(rsub, "show", help="one version's lineage as a table (default: production)")
    r.add_argument("version", nargs="?", default=None)
    shown = r.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="the full record (resolved params, eval, gate) as JSON")
    shown.add_argument("--card", action="store_true", help="its model card (the README.md its bento and exports carry)")
    r.set_defaults(fn=cmd_registry)
    r = add(rsub, "history", help="every version, then every promotion and rollback")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_registry)

    s = add(sub, "export", help="write a registered version as GGUF, its LoRA adapter or the merged model, with its card")
    s.add_argument("version")
    s.add_argument("--format", required=True, choices=("gguf", "adapter", "merged"),
                   help="gguf: llama.cpp f16 + Q8_0; adapter: peft safetensors; merged: safetensors + tokenizer")
    s.add_argument("--out", required=True, help="destination folder (new, or empty)")
    s.set_defaults(fn=cmd_export)

    def deciding(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--reason", required=True, help="why (recorded in the registry)")
        parser.add_argument("--approver", default=None, help="who decides (default: $PHIOPS_APPROVER or user@host)")

    def promoting(parser: argparse.ArgumentParser) -> None:
        deciding(parser)
        parser.add_argument("--no-bento", action="store_true", help="only check the files and assign; build no bento")

    s = add(sub, "promote", help="put a registered version in production and build its bento")
    s.add_argument("version")
    promoting(s)
    s.set_defaults(fn=cmd_promote)

    s = add(sub, "rollback", help="put the previous production version back (or --to VERSION)")
    s.add_argument("--to", default=None, metavar="VERSION")
    promoting(s)
    s.set_defaults(fn=cmd_rollback)

    s = add(sub, "containerize", help="build the OCI image of a version's bento (default: production), offline")
    s.add_argument("version", nargs="?", default=None)
    s.add_argument("--variant", choices=("cpu", "cuda"), default=None,
                   help="torch's CPU build or PyPI's CUDA build (default: container.variant)")
    s.add_argument("--rebuild", action="store_true", help="build even if an image from the same inputs exists")
    s.add_argument("--plan", metavar="DIR", default=None,
                   help="build nothing: write the Dockerfile and build.json (base, args, labels, wheels) to DIR")
    s.set_defaults(fn=cmd_containerize)

    s = add(sub, "deploy", help="run a version's image as the local container (default: production)")
    s.add_argument("version", nargs="?", default=None)
    s.add_argument("--local", action="store_true", help="this machine's Docker engine (docker run --network host)")
    s.add_argument("--stop", action="store_true", help="stop and remove the local container")
    s.set_defaults(fn=cmd_deploy, usage_error=s.error)

    s = add(sub, "approvals", help="flow runs waiting for a person's decision (needs PREFECT_API_URL)")
    s.set_defaults(fn=cmd_approvals)
    for name, text in (("approve", "approve the candidate of a waiting flow run"),
                       ("reject", "reject the candidate of a waiting flow run")):
        s = add(sub, name, help=text)
        s.add_argument("run_id", help="the flow run id (`phiops approvals`)")
        deciding(s)
        s.set_defaults(fn=cmd_decide)

    s = add(sub, "ask", help="serve the production bento, ask one question, print the answer")
    s.add_argument("prompt")
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(fn=cmd_ask)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one `phiops` command.

    Args:
        argv: the arguments (default: the process's).

    Returns:
        The exit code (see the module docstring). A usage error exits 2 from argparse; an
        unexpected exception propagates with its traceback (exit 1).
    """
    procs.lean_gc()  # before anything imports torch: half a stage's start-up and exit was the GC's
    procs.skip_sklearn()  # before anything imports transformers: it would load sklearn for nothing
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
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise  # a bug: the traceback is the report
        # Expected: the message says what to fix (every bad key, row or file); a traceback would bury it.
        return _fail(str(exc), code)


if __name__ == "__main__":
    sys.exit(main())
