"""`phiops export` on a real git + DVC registry of tiny random models (llama and phi3 shapes).

The adapter is a real peft LoRA adapter (random, non-zero B, so it changes the logits) and the
merged model is that adapter merged into the base, each produced by a DVC stage and registered.
Each export is loaded back the way its users load it (transformers' GGUF loader, peft onto the
base, transformers) and must give the merged model's logits within the stated bound.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from phiops import cli, config, lineage, lora
from phiops.artifacts import RegistryError
from phiops.export import ExportError, export
from phiops.paths import Layout
from phiops.registry import Registry

pytestmark = pytest.mark.integration

F16_BOUND = 1e-3  # max |logit difference| of the f16 GGUF vs the fp32 merged model (measured 5.2e-4 / 5.6e-4)
# Q8_0 keeps one fp16 scale per 32 weights: 8-bit rounding of every weight. Measured on these
# tiny models (logits up to 1.5): 1.3e-2 (llama), 1.6e-2 (phi3); the bound leaves 3x for seeds.
Q8_0_BOUND = 5e-2

DVC_YAML = """\
stages:
  train:
    cmd: python -c "import shutil; shutil.copytree('made/adapter', 'models/adapter', dirs_exist_ok=True)"
    deps: [made/adapter]
    outs: [models/adapter]
  merge:
    cmd: python -c "import shutil; shutil.copytree('made/merged', 'models/merged', dirs_exist_ok=True)"
    deps: [made/merged]
    outs: [models/merged]
"""


def _run(cwd: Path, *cmd: str) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def _make(base: Path, arch: str, dest: Path, seed: int) -> None:
    """A random LoRA adapter on `base` and its merge, as the train and merge stages save them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phiops.models import load_tokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=lora.TARGETS[arch], init_lora_weights=False))
    with torch.no_grad():  # a trained adapter's size: it moves the logits, not by orders of magnitude
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    tok = load_tokenizer(base)
    model.save_pretrained(dest / "adapter", safe_serialization=True)
    tok.save_pretrained(dest / "adapter")
    model.merge_and_unload().save_pretrained(dest / "merged", safe_serialization=True)
    tok.save_pretrained(dest / "merged")


def _project(git_dvc_project, base: Path, arch: str) -> tuple[Path, Registry]:
    proj = git_dvc_project(DVC_YAML, files={".gitignore": "/made\n"})
    _make(base, arch, proj / "made", seed=1)
    _run(proj, "dvc", "repro", "-q")
    layout = Layout(proj)
    reg = Registry(layout, "phiops-model")
    reg.register(layout.merged, {"variant": "merged", "components": lineage.components(layout),
                                 "params": config.parse({}).dump()})
    return proj, reg


@pytest.fixture
def llama_project(git_dvc_project, tiny_models):
    return _project(git_dvc_project, tiny_models["llama"], "llama")


def _ids() -> torch.Tensor:
    return torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_ids()).logits


def _merged_logits(proj: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(proj / "models/merged", dtype=torch.float32))


def _sums_hold(out: Path) -> None:
    """SHA256SUMS names every other file with its sha256 (what `sha256sum -c` checks)."""
    lines = (out / "SHA256SUMS").read_text().splitlines()
    listed = {name: digest for digest, name in (line.split("  ", 1) for line in lines)}
    assert set(listed) == {p.name for p in out.iterdir()} - {"SHA256SUMS"}
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_gguf_loads_in_transformers_with_the_merged_models_logits(arch, tmp_path, tiny_models, git_dvc_project):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proj, reg = _project(git_dvc_project, tiny_models[arch], arch)
    out = tmp_path / "gguf"
    export(Layout(proj), "phiops-model", "v1.0.0", "gguf", out)
    assert {p.name for p in out.iterdir()} == {"phiops-model-v1.0.0-f16.gguf", "phiops-model-v1.0.0-q8_0.gguf",
                                               "README.md", "SHA256SUMS"}
    _sums_hold(out)
    assert (out / "README.md").read_text() == reg.card("v1.0.0")
    want = _merged_logits(proj)
    for name, bound in (("f16", F16_BOUND), ("q8_0", Q8_0_BOUND)):
        gguf_file = f"phiops-model-v1.0.0-{name}.gguf"
        got = _logits(AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file, dtype=torch.float32))
        diff = float((got - want).abs().max())
        print(f"{arch} {name}: max |logit diff| {diff:.3g} (logits up to {float(want.abs().max()):.3g})")
        assert diff <= bound, (name, diff)
        assert diff > 0  # really the GGUF's weights, rounded, not the merged model read back
    if arch == "llama":  # transformers builds a byte-level tokenizer only for llama GGUFs (phi3: SentencePiece)
        text = "Order 1234 is late: {\"product\": \"Nimbus\"} <|im_end|>"
        ref = AutoTokenizer.from_pretrained(proj / "models/merged")
        from_gguf = AutoTokenizer.from_pretrained(out, gguf_file="phiops-model-v1.0.0-f16.gguf")
        assert from_gguf.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


def test_adapter_on_the_base_gives_the_merged_logits(llama_project, tmp_path, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proj, reg = llama_project
    out = tmp_path / "adapter"
    export(Layout(proj), "phiops-model", "v1.0.0", "adapter", out)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "SHA256SUMS"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin"))
    assert (out / "README.md").read_text() == reg.card("v1.0.0")  # the card, not peft's stub
    _sums_hold(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    want = _merged_logits(proj)
    diff = float((_logits(PeftModel.from_pretrained(base, out)) - want).abs().max())
    assert diff <= config.parse({}).merge.max_abs_logit_diff
    assert float((_logits(AutoModelForCausalLM.from_pretrained(tiny_models["llama"])) - want).abs().max()) > 1e-2


def test_merged_export_and_the_adapter_of_an_older_version_from_dvc(llama_project, tmp_path, tiny_models, capsys):
    from transformers import AutoModelForCausalLM, GenerationConfig

    proj, reg = llama_project
    v1_adapter = (proj / "models/adapter/adapter_model.safetensors").read_bytes()
    # A newer run: the working tree now holds v2's adapter and merged model.
    shutil.rmtree(proj / "made")
    _make(tiny_models["llama"], "llama", proj / "made", seed=2)
    _run(proj, "dvc", "repro", "-q")
    layout = Layout(proj)
    reg.register(layout.merged, {"variant": "merged", "components": lineage.components(layout)})

    args = ["--root", str(proj), "--params", str(proj / "params.yaml"), "export", "v1.0.0"]
    assert cli.main([*args, "--format", "adapter", "--out", str(tmp_path / "a1")]) == 0
    printed = capsys.readouterr().out
    assert "DVC cache at phiops-model@v1.0.0" in printed and "adapter_model.safetensors" in printed
    assert (tmp_path / "a1/adapter_model.safetensors").read_bytes() == v1_adapter

    assert cli.main([*args, "--format", "merged", "--out", str(tmp_path / "m1")]) == 0
    m1 = tmp_path / "m1"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "SHA256SUMS"} <= {p.name for p in m1.iterdir()}
    _sums_hold(m1)
    GenerationConfig.from_pretrained(m1)
    assert "phiops-model v1.0.0" in (m1 / "README.md").read_text()
    assert not torch.equal(_logits(AutoModelForCausalLM.from_pretrained(m1)), _merged_logits(proj))  # v1, not v2


def test_refusals_say_what_and_where(llama_project, tmp_path, tiny_models, capsys):
    proj, reg = llama_project
    args = ["--root", str(proj), "--params", str(proj / "params.yaml"), "export"]

    assert cli.main([*args, "v9.0.0", "--format", "gguf", "--out", str(tmp_path / "x")]) == cli.EXIT_REFUSED
    assert "no version 'v9.0.0' (registered: v1.0.0)" in capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert cli.main([*args, "v1.0.0", "--format", "merged", "--out", str(taken)]) == cli.EXIT_ARTIFACT
    assert f"--out {taken} exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    # Phi-2 (PhiForCausalLM) has no GGUF mapping here: refused, nothing written.
    from phiops.export import write_gguf

    with pytest.raises(ExportError, match=r"architecture \['PhiForCausalLM'\] cannot be exported to GGUF"):
        write_gguf(tiny_models["phi"], tmp_path / "phi.gguf", "f16", "phi")

    # A record from before versions kept their adapter and merged model: nothing to check them by.
    path = proj / "registry/phiops-model/v1.0.0.json"
    kept = path.read_text()
    path.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k != "components"}))
    with pytest.raises(ExportError, match="registered without a record of its adapter"):
        export(Layout(proj), "phiops-model", "v1.0.0", "adapter", tmp_path / "old")
    path.write_text(kept)

    # The working tree's adapter changed after registration and DVC's cached copy is damaged:
    # the export is refused, naming the file; nothing is left at --out.
    _damage(proj, "models/adapter/adapter_model.safetensors")
    with pytest.raises(RegistryError, match="does not match phiops-model@v1.0.0: changed: adapter_model.safetensors"):
        export(Layout(proj), "phiops-model", "v1.0.0", "adapter", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # The same for the version's own (merged) files, through the CLI.
    _damage(proj, "models/merged/model.safetensors")
    assert cli.main([*args, "v1.0.0", "--format", "gguf", "--out", str(tmp_path / "g")]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "does not match phiops-model@v1.0.0: changed: model.safetensors" in err and not (tmp_path / "g").exists()


def _damage(proj: Path, rel: str) -> None:
    """Another file in the working tree, and one flipped byte in DVC's cached copy of the registered one."""
    path = proj / rel
    payload = path.read_bytes()
    md5 = hashlib.md5(payload).hexdigest()
    cached = proj / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    cached.chmod(0o644)  # DVC keeps its cache read-only
    cached.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    path.unlink()
    path.write_bytes(b"retrained")
