"""What the suite's lm-eval tasks send and count: documents rendered with dpo-align's templates, and the
tokens and UTF-8 bytes lm-eval's HF model scores for each (context, continuation) request.

Both task families (``lm_eval_tasks/dpo_ppl.py`` and ``dpo_contrast.py``) use this module, so a foil
is rendered, encoded and counted exactly like the reference response it stands beside.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import datasets
import lm_eval.api.metrics
import lm_eval.api.model
import lm_eval.api.task
import lm_eval.evaluator_utils

from dpo_align.core.errors import UserError, install_error_boundary
from dpo_align.data.suite_docs import load_docs
from dpo_align.data.templates import DEFAULT_TEMPLATE, check_template, render_prompt, render_response

# --------------------------------------------------------------------------- stderr hook


def use_aggregation_stderr() -> None:
    """Let an aggregation function carry its own standard error (``fn.stderr``).

    lm-eval only knows standard errors for its built-in aggregations and reports "N/A"
    for any other. Ours are closed-form (see dpo_align.score.metrics), so we wrap lm-eval's
    lookup: functions with a ``stderr`` attribute use it, all others are unchanged, and
    ``--bootstrap_iters 0`` still turns standard errors off.
    """
    original = lm_eval.api.metrics.stderr_for_metric
    if getattr(original, "dpo_align_hook", False):
        return

    def stderr_for_metric(metric, bootstrap_iters):
        own = getattr(metric, "stderr", None)
        if own is not None and bootstrap_iters > 0:
            return own
        return original(metric, bootstrap_iters)

    stderr_for_metric.dpo_align_hook = True
    lm_eval.api.metrics.stderr_for_metric = stderr_for_metric
    lm_eval.evaluator_utils.stderr_for_metric = stderr_for_metric


use_aggregation_stderr()
install_error_boundary()  # a UserError from the tasks ends plain `lm_eval` with its message, not a traceback


# --------------------------------------------------------------------------- metadata

# the keys the suite's tasks read from --metadata; lm-eval also copies every --model_args key into it
OWN_KEYS = ("template", "data_dir", "pku_path", "dataset_revisions", "tokenizer", "pref_path", "reference", "reference_device")
MODEL_KEYS = ("pretrained", "peft", "gguf_file", "revision", "trust_remote_code")  # model args the tasks read too


def check_metadata(metadata: dict) -> dict:
    """Refuse a key that is a misspelling of one of ours (``data_dri`` would quietly score the hub's copy instead of
    the local files), and values of the wrong type. Other unknown keys are lm-eval's --model_args, merged into the
    same dict, and pass.

    ``trust_remote_code`` must be a JSON boolean: ``bool("false")`` is True, so a string there once ran a checkpoint's
    code while the user asked for the opposite. lm-eval's ``--model_args`` parser already turns ``true``/``false``
    into booleans; ``--metadata`` is JSON, where only ``true`` may turn remote code on."""
    import difflib

    for key in metadata:
        if key in OWN_KEYS or key in MODEL_KEYS:
            continue
        close = difflib.get_close_matches(key, OWN_KEYS, n=1, cutoff=0.75)
        if close:
            raise UserError(f"--metadata: unknown key {key!r} (did you mean {close[0]!r}?). The suite reads: {', '.join(OWN_KEYS)}.")
    for key in ("template", "data_dir", "pku_path", "tokenizer", "pref_path", "reference", "reference_device"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            raise UserError(f"--metadata: {key} is {metadata[key]!r}; it takes a string (a path or a name).")
    remote = metadata.get("trust_remote_code")
    if remote is not None and not isinstance(remote, bool):
        raise UserError(f"--metadata/--model_args: trust_remote_code is {remote!r} ({type(remote).__name__}); it takes a boolean: "
                        "JSON true or false, not a string or a number. Remote code runs only for a boolean true.")
    if metadata.get("dataset_revisions") is not None and not isinstance(metadata["dataset_revisions"], dict):
        raise UserError(f"--metadata: dataset_revisions is {metadata['dataset_revisions']!r}; it takes an object such as "
                        '{"winogrande": "SHA"}.')
    return metadata


def remote_code_allowed(metadata: dict) -> bool:
    """True only for a boolean ``true`` (after ``check_metadata``, anything else is refused or absent)."""
    return check_metadata(metadata).get("trust_remote_code") is True


def check_request_options(task, kwargs: dict, *, reference: bool = False) -> None:
    """Refuse lm-eval options that would change what the suite measures, before any request is built.

    ``--system_instruction`` puts other text before every prompt than the templates the suite defines (and than training
    saw; ``--num_fewshot`` needs no check: the tasks' YAML fixes it at 0, and lm-eval then ignores the option);
    ``--cache_requests`` restores requests keyed on the task's name, not its data, so a data file changed in place would
    be scored with the old requests; ``--use_cache`` returns stored responses keyed on the request text alone, so a
    model retrained at the same path keeps its old numbers. ``--apply_chat_template`` is applied by lm-eval
    to every request alike and stays allowed, except beside a ``reference`` model, whose requests are built without it."""
    name = getattr(task.config, "task", "the task")
    if isinstance(evaluating_lm(), lm_eval.api.model.CachingLM):
        raise UserError(f"{name}: --use_cache returns the responses stored for the same request text, whatever the model's "
                        "weights now are, so an adapter retrained at the same path would keep its old ce. Leave it out "
                        "(dpo-align eval keeps its own cache, keyed on the adapter's and the data's content).")
    if kwargs.get("system_instruction"):
        raise UserError(f"{name}: --system_instruction changes every prompt the suite scores (its templates are fixed, as in training); "
                        "leave it out, or choose the prompt format with --metadata '{\"template\": \"chat\"}'.")
    if kwargs.get("cache_requests"):
        raise UserError(f"{name}: --cache_requests restores requests keyed on the task's name, not on its data files, so a file "
                        "changed in place would be scored with the old requests. Leave it out: building the suite's requests takes seconds.")
    if reference and kwargs.get("apply_chat_template"):
        raise UserError(f"{name}: --apply_chat_template with --metadata reference: the reference's requests are built without it, so "
                        "the reward margins would compare two formats. Use --metadata '{\"template\": \"chat\"}' instead.")


def evaluating_lm():
    """The model lm-eval's evaluator is scoring with (``lm`` in ``evaluate(lm, ...)``, possibly its ``--use_cache``
    wrapper), or None outside the evaluator. lm-eval hands a task no handle on its model, and two checks need one:
    ``--use_cache`` (the wrapper) and ``reward_acc`` (the reference is scored the policy's way), so it is read from the
    calling frames."""
    import inspect

    frame = inspect.currentframe()
    while frame is not None:
        lm = frame.f_locals.get("lm")
        if isinstance(lm, (lm_eval.api.model.LM, lm_eval.api.model.CachingLM)):
            return lm
        frame = frame.f_back
    return None


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_source(metadata: dict) -> tuple[str, dict]:
    """The run's tokenizer: ``tokenizer`` if given, else ``pretrained`` (with ``peft`` the
    base model's), honouring ``gguf_file``, ``revision`` and ``trust_remote_code``."""
    source = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(source, str) or not source:
        raise UserError(
            "dpo_ppl tasks count response tokens with the run's tokenizer, but no model path was found. "
            "Pass --model_args pretrained=MODEL (or tokenizer=...), or with a model object, "
            "--metadata '{\"tokenizer\": \"PATH\"}'."
        )
    kwargs = {"trust_remote_code": remote_code_allowed(metadata)}
    if metadata.get("gguf_file") and not metadata.get("tokenizer"):
        kwargs["gguf_file"] = metadata["gguf_file"]
    if metadata.get("revision"):
        kwargs["revision"] = metadata["revision"]
    return source, kwargs


@functools.lru_cache(maxsize=4)
def _load_tokenizer(source: str, frozen_kwargs: tuple):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **dict(frozen_kwargs))


def tokenizer_for(metadata: dict):
    source, kwargs = _tokenizer_source(metadata)
    return _load_tokenizer(source, tuple(sorted(kwargs.items())))


def _pair_split(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's ``_encode_pair``: the context's trailing whitespace moves to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def continuation_token_count(tokenizer, context: str, continuation: str) -> int:
    """Tokens lm-eval's HF model scores for (context, continuation): those of
    encode(context + continuation) past len(encode(context)), as ``LM._encode_pair`` splits them."""
    return scored_span(tokenizer, context, continuation)[0]


class Span(NamedTuple):
    tokens: int  # scored continuation tokens
    bytes: int  # UTF-8 bytes of the text they cover
    merged: bool  # the continuation's first characters were merged into the context's last token
    length: int  # tokens of the whole request (context and continuation), what must fit the model's window


def scored_span(tokenizer, context: str, continuation: str) -> Span:
    """(scored tokens, scored UTF-8 bytes, boundary merge, request length) for one (context, continuation) pair.

    lm-eval scores ``whole[len(encode(context)):]`` where ``whole = encode(context + continuation)``.
    When a pre-tokenizer glues the context's last characters to the continuation's first ones
    (Llama-3's and Qwen2's ``[^\\s\\p{L}\\p{N}]+[\\r\\n]*`` makes one token of ``":\\n"``), encode(context)
    is not a prefix of ``whole``: lm-eval feeds encode(context) and then ``whole[len(encode(context)):]``,
    so the merged characters (the newline) are neither seen by the model nor scored. The bytes
    are then those of the text the scored tokens actually cover (from the tokenizer's character
    offsets), not of the whole continuation, and the merge is reported (``boundary_merge``).
    """
    context, continuation = _pair_split(context, continuation)
    text = context + continuation
    context_ids = tokenizer.encode(context)
    try:
        encoded = tokenizer(text, return_offsets_mapping=True)
        whole, offsets = encoded["input_ids"], encoded["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: no offsets
        whole, offsets = tokenizer.encode(text), None
    n_context = len(context_ids)
    merged = whole[:n_context] != context_ids
    n_tokens = len(whole) - n_context
    if offsets is not None and n_tokens > 0:
        starts = [start for start, end in offsets[n_context:] if end > start]  # special tokens have empty spans
        first = min(starts) if starts else len(text)
        n_bytes = len(text[first:].encode("utf-8"))
    else:  # without offsets the covered text is unknown: the whole continuation (the merge is still reported)
        n_bytes = len(continuation.encode("utf-8"))
    return Span(n_tokens, n_bytes, merged, len(whole))


# --------------------------------------------------------------------------- the model's window


def context_window(metadata: dict, tokenizer) -> int | None:
    """The positions lm-eval's HF model scores a request within (``HFLM.max_length``): ``max_length`` from
    ``--model_args``, else the model config's (``n_positions``, ``max_position_embeddings``...), else the tokenizer's,
    else 2048, by lm-eval's own ``resolve_max_length``. None where the model is not a path (a model object handed to
    lm-eval in Python): then truncation is not counted."""
    if metadata.get("max_length"):
        return int(metadata["max_length"])
    source = metadata.get("pretrained")
    if not isinstance(source, str) or not source:
        return None
    kwargs = {"trust_remote_code": remote_code_allowed(metadata)}
    for key in ("gguf_file", "revision"):
        if metadata.get(key):
            kwargs[key] = metadata[key]
    return _window(source, tuple(sorted(kwargs.items())), tokenizer)


@functools.lru_cache(maxsize=4)
def _window(source: str, frozen_kwargs: tuple, tokenizer) -> int | None:
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **dict(frozen_kwargs))
    except (OSError, ValueError):  # lm-eval itself will say what is wrong with the model
        return None
    return resolve_max_length(config, tokenizer)


def fits(task: str, doc_id, span: Span, window: int | None) -> bool:
    """False where lm-eval will cut the request's context from the left to fit ``window`` (the template's header goes
    first): counted and shown as ``truncated``. A continuation longer than the window cannot be scored at all (lm-eval
    stops on an AssertionError): a clear error, before anything is scored."""
    if window is None:
        return True
    if span.tokens > window:
        raise UserError(f"{task}: document {doc_id}'s response is {span.tokens} tokens, longer than the {window} positions the "
                        "model scores (its max_length): it cannot be scored. Leave this dataset out, or score a model whose "
                        "context window holds it.")
    return span.length <= window + 1  # lm-eval keeps the last max_length + 1 tokens (the last one is only predicted)


# --------------------------------------------------------------------------- documents


def suite_dataset(name: str, metadata: dict, *, foils: bool = False) -> dict:
    """One scoring dataset as lm-eval's ``custom_dataset``: each document's ``context`` (the templated prompt) and
    ``continuation`` (``"\n" + response``); with ``foils``, also ``choices``: the reference continuation first, then
    every foil rendered the same way (the dpo_contrast tasks)."""
    check_metadata(metadata)
    template = check_template(metadata.get("template") or DEFAULT_TEMPLATE, option="metadata 'template'")
    tokenizer = tokenizer_for(metadata) if template == "chat" else None
    docs = load_docs(
        name,
        data_dir=metadata.get("data_dir"),  # load_docs falls back to env DPO_ALIGN_DATA_DIR
        pku_path=metadata.get("pku_path"),
        # a hub set pinned to a branch, tag or commit: --metadata '{"dataset_revisions": {"winogrande": "SHA"}}'
        revision=(metadata.get("dataset_revisions") or {}).get(name),
        foils=foils,
    )
    for doc in docs:
        doc["context"] = render_prompt(doc["instruction"], template, tokenizer)
        doc["continuation"] = render_response(doc["response"], template)
        if foils:
            doc["choices"] = [doc["continuation"]] + [render_response(foil, template) for foil in doc["foils"]]
    return {"test": datasets.Dataset.from_list(docs)}


class SpannedTask(lm_eval.api.task.ConfigurableTask):
    """The suite's scoring tasks (dpo_ppl, dpo_contrast): the tokenizer and window of the run, and each request's
    scored span counted from the requests lm-eval actually sends (after any --apply_chat_template, or restored from its
    request cache), as ``self._spans[doc id, request index] = (Span, fits the window)``."""

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        config = dict(config or {})
        config.pop("class", None)
        super().__init__(config=config, **kwargs)
        self._tokenizer = tokenizer_for(self.config.metadata or {})
        self._window = context_window(self.config.metadata or {}, self._tokenizer)
        self._spans: dict = {}

    def build_all_requests(self, *args, **kwargs):
        check_request_options(self, kwargs)
        result = super().build_all_requests(*args, **kwargs)
        for instance in self._instances:
            span = scored_span(self._tokenizer, *instance.arguments)
            self._spans[instance.doc["id"], instance.idx] = span, fits(self.config.task, instance.doc["id"], span, self._window)
        return result
