"""The stored checkpoint a service loads: its integrity, its lineage and its end-of-turn ids."""

from __future__ import annotations

import os
from typing import Any

from phiops.io import sha256_file

# Where phiops.bento.save_model puts the checkpoint inside a stored model.
CHECKPOINT_SUBDIR = "checkpoint"

# Tokens that end a turn in the chat formats phiops serves (ChatML, Phi-3, Llama-3), whatever
# the checkpoint declares as its EOS: Phi-3 ends turns with <|end|> while its EOS is
# <|endoftext|>, and a model that emits an undeclared one would otherwise run on.
END_OF_TURN = ("<|im_end|>", "<|end|>", "<|endoftext|>", "<|eot_id|>")


class IntegrityError(RuntimeError):
    """The stored model is not the one saved: restarting the worker cannot fix it."""


def verify_checkpoint(path: str, manifest: dict[str, str] | None, tag: str) -> None:
    """Check every checkpoint file against the sha256 manifest saved with the model.

    Raises:
        IntegrityError: no manifest, or a file is missing, unrecorded or differs (names the files).
    """
    if not manifest:
        raise IntegrityError(f"{tag}: the stored model has no sha256 manifest (metadata phiops.files); "
                           "save it with phiops.bento.save_model")
    found = {os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names}
    problems = [f"{rel}: missing" for rel in sorted(set(manifest) - found)]
    problems += [f"{rel}: not in the manifest" for rel in sorted(found - set(manifest))]
    for rel in sorted(set(manifest) & found):
        actual = sha256_file(os.path.join(path, rel))
        if actual != manifest[rel]:
            problems.append(f"{rel}: sha256 {actual[:16]}... but the manifest says {manifest[rel][:16]}...")
    if problems:
        raise IntegrityError(
            f"{tag}: checkpoint files differ from the sha256 manifest saved with the model; refusing to "
            "serve a damaged or altered model (save it again from the registry):\n  - " + "\n  - ".join(problems)
        )


def lineage(metadata: dict[str, Any]) -> dict[str, Any]:
    """Registry version, data hash and git revision from the stored model's metadata.

    ``phiops`` records them under ``"registry"`` (a dict, or the version string of older
    models); top-level keys of the same names are read too. Missing facts are None.
    """
    reg = metadata.get("registry")
    reg = reg if isinstance(reg, dict) else ({"version": reg} if isinstance(reg, str) else {})

    def pick(*keys: str) -> Any:
        for key in keys:
            for source in (reg, metadata):
                if source.get(key) is not None:
                    return source[key]
        return None

    return {
        "artifact": pick("artifact"),
        "registry_version": pick("version", "registry_version"),
        "data_hash": pick("data_hash"),
        "git_rev": pick("git_rev", "git_revision"),
        "git_tag": pick("git_tag"),
    }



def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a turn: generation_config's (int or list), the tokenizer's, then the
    :data:`END_OF_TURN` tokens its vocabulary has. The first is the engine's padding id."""
    ids: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for i in [source] if isinstance(source, int) else list(source):
            if int(i) not in ids:
                ids.append(int(i))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]
    if not ids:
        raise RuntimeError("the checkpoint defines no EOS token (generation_config or tokenizer)")
    return ids

