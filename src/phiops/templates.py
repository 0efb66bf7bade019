"""Named chat templates for checkpoints that ship none.

`model.chat_template: auto` uses the tokenizer's own template (the right choice whenever the
checkpoint has one: it is what the model saw in instruction tuning and what serving uses).
These are for base checkpoints without one. Each ends the assistant turn with the model's
end-of-turn token so the stop token is part of the trained labels.
"""

from __future__ import annotations

TEMPLATES: dict[str, str] = {
    # Phi-2 was trained on "Instruct: ... Output: ..." QA pairs; it has no special turn tokens,
    # so the EOS token closes the answer.
    "phi-2": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'Instruct: ' + m['content'] + '\n' }}"
        "{% else %}{{ 'Output: ' + m['content'] + eos_token + '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Output: ' }}{% endif %}"
    ),
    "phi-3": (
        "{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "phi-4": (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # The seed project's format.
    "alpaca": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


def apply(tokenizer, name: str) -> None:
    """Install template `name` on `tokenizer` (no-op for `auto` when it already has one).

    Raises:
        ValueError: `auto` was asked for but the tokenizer has no chat template.
    """
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "model.chat_template is 'auto' but the checkpoint has no chat template; "
                f"choose one of {sorted(TEMPLATES)}"
            )
        return
    tokenizer.chat_template = TEMPLATES[name]
