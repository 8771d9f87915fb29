"""Instruction templates: the one place where prompts and responses are rendered.

Training (the ``prompt``/``chosen``/``rejected`` columns given to TRL) and scoring (the
lm-eval context and continuation) both call `render_prompt` and `render_response`, so a
model is scored on exactly the text layout it was trained on.
"""

from __future__ import annotations

from dpo_align.core.errors import UserError

# The template LaMini-GPT (the reference SFT model) was trained with. The three blank
# lines are part of it: keep this string byte for byte.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task.\n"
    "Write a response that appropriately completes the request.\n\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

TEMPLATES = ("alpaca", "chat", "raw")
DEFAULT_TEMPLATE = "alpaca"


def check_template(name: str, option: str = "--template") -> str:
    """The one check of a template name, for options, settings files and task metadata alike."""
    if name not in TEMPLATES:
        raise UserError(f"{option} {name!r} is not one of: {', '.join(TEMPLATES)} (default {DEFAULT_TEMPLATE}).")
    return name


def render_prompt(instruction: str, template: str = DEFAULT_TEMPLATE, tokenizer=None) -> str:
    """The text a response is conditioned on.

    ``alpaca``: the Alpaca prompt above. ``chat``: the instruction as one user message
    through the tokenizer's chat template, with the generation prompt. ``raw``: the
    instruction followed by a newline.
    """
    check_template(template)
    if template == "alpaca":
        return ALPACA_PROMPT.format(instruction=instruction)
    if template == "raw":
        return instruction + "\n"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "Template 'chat' needs a tokenizer with a chat template, and this model's "
            "tokenizer has none. Use --template alpaca or raw, or a chat model."
        )
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    except jinja2.TemplateError as err:  # a broken template, or one that raises for this conversation
        where = getattr(tokenizer, "name_or_path", "") or "this model"
        raise UserError(f"Template 'chat': the chat template of {where}'s tokenizer fails on a one-message conversation "
                        f"({type(err).__name__}: {err}). Fix chat_template (tokenizer_config.json or chat_template.jinja), "
                        "or use --template alpaca or raw.") from None


def render_response(response: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The text that follows the prompt: ``"\\n" + response`` for alpaca, unchanged otherwise."""
    check_template(template)
    return "\n" + response if template == "alpaca" else response
