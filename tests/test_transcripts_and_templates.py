"""The exact parsing and rendering rules every other part of the tool relies on."""

import pytest

from dpo_align.core.errors import UserError
from dpo_align.data.templates import ALPACA_PROMPT, render_prompt, render_response
from dpo_align.data.transcripts import ASSISTANT, HUMAN, Turn, render_instruction, split_transcript


def test_split_at_markers_and_strip_turns():
    lead, turns = split_transcript("\n\nHuman:  hi there \n\nAssistant: hello \n\nHuman: bye\n\nAssistant:  ok  ")
    assert lead == ""
    assert turns == [Turn(HUMAN, "hi there"), Turn(ASSISTANT, "hello"), Turn(HUMAN, "bye"), Turn(ASSISTANT, "ok")]


def test_marker_needs_the_space_after_the_colon():
    # "\n\nAssistant:" with no space is not a marker: it stays inside the previous turn.
    _, turns = split_transcript("\n\nHuman: hi\n\nAssistant:")
    assert turns == [Turn(HUMAN, "hi\n\nAssistant:")]


def test_text_before_first_marker_is_returned():
    lead, turns = split_transcript("preamble\n\nHuman: q\n\nAssistant: a")
    assert lead == "preamble" and len(turns) == 2


def test_single_human_turn_renders_as_its_text():
    assert render_instruction([Turn(HUMAN, "What is 2+2?")]) == "What is 2+2?"


def test_multi_turn_context_renders_with_role_prefixes():
    context = [Turn(HUMAN, "a"), Turn(ASSISTANT, "b"), Turn(HUMAN, "c")]
    assert render_instruction(context) == "Human: a\nAssistant: b\nHuman: c"


def test_alpaca_prompt_is_byte_exact():
    expected = (
        "Below is an instruction that describes a task.\nWrite a response that appropriately completes the request."
        "\n\n\n### Instruction:\nDo X\n\n### Response:"
    )
    assert render_prompt("Do X", "alpaca") == expected
    assert ALPACA_PROMPT.format(instruction="Do X") == expected
    assert render_response("Sure.", "alpaca") == "\nSure."


def test_raw_template():
    assert render_prompt("Do X", "raw") + render_response("Sure.", "raw") == "Do X\nSure."


def test_chat_template_uses_the_tokenizers_chat_template(tiny_gpt2):
    from dpo_align.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_gpt2))
    with pytest.raises(UserError, match="chat template"):
        render_prompt("Do X", "chat", tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render_prompt("Do X", "chat", tokenizer) == "<user>Do X<assistant>"
    assert render_response("Sure.", "chat") == "Sure."


def test_unknown_template_lists_the_choices():
    with pytest.raises(UserError, match="alpaca, chat, raw"):
        render_prompt("x", "vicuna")
