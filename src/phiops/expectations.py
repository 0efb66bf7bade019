"""The Great Expectations suites of the validate stage: one per input format, run per chunk.

Each rule is one expectation on a column of a chunk's DataFrame (built by
:mod:`phiops.stages.validate`): required fields present, of the right type, not blank; chat
messages well formed and in a valid role order; no control characters or special tokens; token
length within bounds; no duplicates; no train/test leakage; optional PII patterns. The rule's
name rides in the expectation's ``meta`` so a result maps back to its :class:`Check`.

Great Expectations is imported only when a suite is built: importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiops import data as D
from phiops.config import Params

# C0 controls except tab/LF/CR, DEL, and C1 controls: invisible, and they poison tokenizers.
CONTROL_RE = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"


@dataclass(frozen=True)
class Check:
    """One rule: its name, its GX expectation, and whether a failing row is only warned about."""

    key: str  # the rule name in messages and the report
    expectation: Any
    warning: bool = False  # recorded and counted, the row is kept

    @property
    def gx_type(self) -> str:
        return self.expectation.expectation_type


def checks_for(fmt: D.Format, cfg: Params, specials: Sequence[str]) -> list[Check]:
    """The expectation suite of one format, under the configured policies.

    Args:
        fmt: the input format the chunk's columns come from.
        cfg: the config (``validate.*``: token bounds, over-length and PII policies).
        specials: the tokenizer's special tokens, refused when written as text.

    Returns:
        The checks, each expectation tagged with its rule name in ``meta["phiops_check"]``.
    """
    import great_expectations as gx

    E = gx.expectations
    vcfg = cfg.validate_
    checks: list[Check] = []

    def add(key: str, exp_cls: Any, description: str, warning: bool = False, **kw: Any) -> None:
        checks.append(Check(key, exp_cls(meta={"phiops_check": key}, description=description, **kw), warning))

    if fmt == "chat":
        add("required:messages", E.ExpectColumnValuesToNotBeNull, "`messages` is present and not null", column="messages")
        add("type:messages", E.ExpectColumnValuesToBeOfType, "`messages` is a list", column="messages", type_="list")
        add("structure", E.ExpectColumnValuesToBeNull,
            "every message is an object with a known `role` and a non-empty string `content`", column="messages_error")
        add("role_order", E.ExpectColumnValuesToMatchRegex,
            "optional system message, then user/assistant alternating, ending with assistant",
            column="roles", regex=D.ROLE_ORDER_RE)
    else:
        for col in D.FIELDS[fmt] + D.OPTIONAL[fmt]:
            required = col in D.FIELDS[fmt]
            add(f"required:{col}", E.ExpectColumnValuesToNotBeNull,
                f"`{col}` is present and not null" if required else f"`{col}`, when present, is not null", column=col)
            add(f"type:{col}", E.ExpectColumnValuesToBeOfType, f"`{col}` is a string", column=col, type_="str")
            if required:
                add(f"blank:{col}", E.ExpectColumnValuesToMatchRegex, f"`{col}` is not empty or only whitespace",
                    column=col, regex=r"\S")
    add("control", E.ExpectColumnValuesToNotMatchRegex, "no control characters (tab and newlines allowed)",
        column="text", regex=CONTROL_RE)
    special = D.special_token_pattern(specials)
    if special:
        add("special_tokens", E.ExpectColumnValuesToNotMatchRegex,
            "no special token of the tokenizer written as text (it would end a turn mid-answer)",
            column="text", regex=special)
    if vcfg.over_length == "reject":
        add("tokens", E.ExpectColumnValuesToBeBetween, f"content is {vcfg.min_tokens}..{vcfg.max_tokens} tokens",
            column="n_tokens", min_value=vcfg.min_tokens, max_value=vcfg.max_tokens)
    else:
        add("tokens", E.ExpectColumnValuesToBeBetween, f"content is at least {vcfg.min_tokens} tokens",
            column="n_tokens", min_value=vcfg.min_tokens)
        add("over_length", E.ExpectColumnValuesToBeBetween,
            f"content is at most {vcfg.max_tokens} tokens (longer rows are kept and truncated by format)",
            warning=True, column="n_tokens", max_value=vcfg.max_tokens)
    add("duplicate", E.ExpectColumnValuesToBeNull, "no exact duplicate of an earlier row", column="duplicate_of")
    add("near_duplicate", E.ExpectColumnValuesToBeNull,
        "no duplicate after folding case, Unicode form and whitespace", column="near_duplicate_of")
    add("leakage", E.ExpectColumnValuesToBeNull, "no prompt in both the train and the test split", column="leak_of")
    if vcfg.pii != "off":
        for kind, pattern in vcfg.pii_patterns.items():
            add(f"pii:{kind}", E.ExpectColumnValuesToNotMatchRegex, f"no {kind}-like string (PII policy {vcfg.pii})",
                warning=vcfg.pii == "warn", column="text", regex=pattern)
    return checks


class Suites:
    """One ephemeral GX context; a suite and validation definition per format, run per chunk."""

    def __init__(self, cfg: Params, specials: Sequence[str]):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.cfg, self.specials = cfg, specials
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.ctx.data_sources.add_pandas("phiops")
        self.by_format: dict[str, tuple[Any, dict[str, Check]]] = {}

    def run(self, fmt: D.Format, df: Any) -> tuple[Any, dict[str, Check]]:
        """Validate one chunk's DataFrame against the suite of `fmt` (built on first use).

        Args:
            fmt: the chunk's input format.
            df: the chunk as columns (:mod:`phiops.stages.validate` builds it), with a ``row``
                column that unexpected rows are reported by.

        Returns:
            (GX's validation result, the checks by rule name).
        """
        import great_expectations as gx

        if fmt not in self.by_format:
            checks = checks_for(fmt, self.cfg, self.specials)
            batch = self.source.add_dataframe_asset(fmt).add_batch_definition_whole_dataframe("chunk")
            suite = self.ctx.suites.add(gx.ExpectationSuite(name=f"phiops_validate_{fmt}"))
            for c in checks:
                suite.add_expectation(c.expectation)
            vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=fmt, data=batch, suite=suite))
            self.by_format[fmt] = (vd, {c.key: c for c in checks})
        vd, checks_by_key = self.by_format[fmt]
        result = vd.run(batch_parameters={"dataframe": df},
                        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]})
        return result, checks_by_key

    def build_docs(self, docs_dir: Path) -> None:
        """Render the suites and every chunk's validation result as a Data Docs site."""
        # The ephemeral context ships a default site under a fresh temp dir; point one site at
        # ours instead so nothing is left behind in /tmp.
        for name in list(self.ctx.get_site_names()):
            self.ctx.delete_data_docs_site(name)
        self.ctx.add_data_docs_site("phiops", {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        self.ctx.build_data_docs(site_names=["phiops"])
