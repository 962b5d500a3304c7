"""Fitting examples into a stage's ``max_length``: the prompt is cut from the left, never the response.

A training sequence is ``prompt + response`` (+ eos where the trainer adds one). When it is longer than ``max_length``
(or its prompt longer than ``max_prompt_length``), the prompt loses its oldest tokens: its start tokens (BOS, or a chat
template's opening special token) stay, then come its most recent tokens. The response is never cut. An example whose
longest response does not fit even after the prompt's start tokens alone is dropped (``response_too_long``), and so
is a pair whose responses are one token sequence (``identical``: no preference to learn). A stage stops with a
UserError when it would lose more than ``max_dropped_fraction`` of its examples.

The rule is on token ids (``cut_prompt``, ``fit_example``). ``PromptFitter`` applies it to text for the consumers that
tokenize text themselves (TRL's trainers, the reward model's ``sequence_rewards``, the rollout engines): it measures
``prompt + response`` as they tokenize it (``tokenizer(prompt)``, ``tokenizer(prompt + response + eos)``, the response
being what follows the two's common prefix, TRL's rule), cuts the prompt's text at a token boundary (the offsets
mapping) and measures the cut text again.
"""

from __future__ import annotations

import dataclasses

from alignment.errors import UserError

IDENTICAL, RESPONSE_TOO_LONG = "identical", "response_too_long"
REASONS = {IDENTICAL: "identical after tokenization",
           RESPONSE_TOO_LONG: "answer longer than max_length even with the prompt cut to its start"}


# ----------------------------------------------------------------------------------------------- on token ids


def cut_prompt(prompt_ids: list[int], response_length: int, max_length: int, max_prompt_length: int | None = None,
               keep_start: int = 0) -> list[int] | None:
    """``prompt_ids`` cut from the left so that it and a response of ``response_length`` tokens fit in ``max_length``
    tokens, and it in ``max_prompt_length``: its first ``keep_start`` tokens (BOS), then its last ones. None when the
    response does not fit even after the start tokens alone."""
    room = max_length - response_length
    if room < keep_start:
        return None
    if max_prompt_length is not None:
        room = min(room, max(max_prompt_length, keep_start))
    if len(prompt_ids) <= room:
        return list(prompt_ids)
    tail = room - keep_start
    return list(prompt_ids[:keep_start]) + (list(prompt_ids[len(prompt_ids) - tail :]) if tail else [])


def fit_example(prompt_ids: list[int], responses: list[list[int]], max_length: int,
                max_prompt_length: int | None = None, keep_start: int = 0) -> tuple[list[int] | None, str | None]:
    """(the prompt to train on, None), or (None, why the example is dropped): ``identical`` when its two or more
    responses are one token sequence, ``response_too_long`` when its longest response does not fit (``cut_prompt``)."""
    if len(responses) > 1 and all(r == responses[0] for r in responses[1:]):
        return None, IDENTICAL
    longest = max((len(r) for r in responses), default=0)
    prompt = cut_prompt(prompt_ids, longest, max_length, max_prompt_length, keep_start)
    return (prompt, None) if prompt is not None else (None, RESPONSE_TOO_LONG)


def leading_special(ids: list[int], special_ids: set[int]) -> int:
    """How many of ``ids``' first tokens are special tokens (BOS, a template's opening token): kept by a cut."""
    n = 0
    while n < len(ids) and ids[n] in special_ids:
        n += 1
    return n


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------------- on text


@dataclasses.dataclass(frozen=True)
class Fitted:
    prompt: str | None  # the prompt text to use (None: the example is dropped)
    reason: str | None = None  # why it is dropped
    cut: bool = False  # the prompt lost some of its oldest tokens
    prompt_tokens: int = 0  # the original prompt's length in tokens (for messages)


class PromptFitter:
    """Cuts prompt texts (from the left) so that ``prompt + response`` (+ eos with ``eos``) fits ``max_length`` tokens
    as a trainer tokenizes it, and the prompt ``max_prompt_length``."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None, eos: bool = True,
                 field: str = "data"):
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.eos_text = tokenizer.eos_token if eos else ""
        self.special = set(tokenizer.all_special_ids)
        self.field = field

    def encode(self, prompts: list[str], responses: list[list[str]]) -> list[tuple[list[int], list[list[int]]]]:
        """Per example: the prompt's ids and each response's ids, as a trainer builds them."""
        tok = self.tokenizer
        prompt_ids = tok(list(prompts))["input_ids"] if prompts else []
        flat = [p + r + self.eos_text for p, rs in zip(prompts, responses) for r in rs]
        full = tok(flat)["input_ids"] if flat else []
        out, at = [], 0
        for ids, rs in zip(prompt_ids, responses):
            mine, at = full[at : at + len(rs)], at + len(rs)
            n = min((common_prefix_length(ids, f) for f in mine), default=len(ids))
            out.append((ids[:n], [f[n:] for f in mine]))
        return out

    def fit(self, prompts: list[str], responses: list[list[str]]) -> list[Fitted]:
        out = []
        for prompt, rs, (ids, response_ids) in zip(prompts, responses, self.encode(prompts, responses)):
            start = leading_special(ids, self.special)
            kept, reason = fit_example(ids, response_ids, self.max_length, self.max_prompt_length, start)
            if reason is not None:
                out.append(Fitted(None, reason, prompt_tokens=len(ids)))
            elif len(kept) == len(ids):
                out.append(Fitted(prompt, prompt_tokens=len(ids)))
            else:
                out.append(self._cut(prompt, rs, len(kept) - start, len(ids)))
        return out

    def _cut(self, prompt: str, responses: list[str], tail: int, length: int) -> Fitted:
        """The prompt's start tokens' text and the text from its ``tail``-th last token on, measured again (tokens can
        merge differently at the cut): while too long, a few more tokens go."""
        try:
            enc = self.tokenizer(prompt, return_offsets_mapping=True)
        except NotImplementedError:
            raise UserError(f"{self.field}: prompts longer than max_length must be cut at a token boundary, which "
                            "needs a fast tokenizer (offsets mapping); raise `max_length`, or shorten the prompts"
                            ) from None
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = leading_special(ids, self.special)
        head = prompt[: offsets[start - 1][1]] if start else ""
        shift = len(ids) - length  # tokens of the prompt alone past the common prefix (a merge at the boundary)
        while True:
            text = head + (prompt[offsets[len(ids) - shift - tail][0] :] if tail > 0 else "")
            (ids_now, response_ids), = self.encode([text], [responses])
            longest = max((len(r) for r in response_ids), default=0)
            excess = max(len(ids_now) + longest - self.max_length,
                         len(ids_now) - (self.max_prompt_length or len(ids_now)))
            if excess <= 0:
                return Fitted(text, cut=True, prompt_tokens=length)
            if tail == 0:
                return Fitted(None, RESPONSE_TOO_LONG, prompt_tokens=length)
            tail = max(0, tail - excess)


# --------------------------------------------------------------------------------------------- on data rows


@dataclasses.dataclass
class FitReport:
    """What fitting did to a data source's rows: kept rows, dropped counts per reason, prompts cut."""

    rows: list[dict]
    dropped: dict[str, int]
    cut: int
    total: int  # rows before fitting (+ those a loader dropped already)

    @property
    def lost(self) -> int:
        return sum(self.dropped.values())

    def metrics(self, what: str = "pairs", split: str = "") -> dict:
        """``dropped_<split><what>`` (per reason) and, when prompts were cut, ``<split>long_prompts_truncated``."""
        out: dict = {f"dropped_{split}{what}": dict(self.dropped)}
        if self.cut:
            out[f"{split}long_prompts_truncated"] = self.cut
        return out


def fit_rows(rows: list[dict], fitter: PromptFitter, response_keys: tuple[str, ...], long_prompts: str,
             max_dropped_fraction: float, already_identical: int = 0, what: str = "pairs") -> FitReport:
    """``rows`` with their ``prompt`` cut to fit (``response_keys``: the responses), the rows that cannot fit dropped
    and counted (``already_identical``: pairs the loader dropped as identical text, counted with them). See
    ``check_fit`` for the console lines and the errors."""
    fitted = fitter.fit([str(r["prompt"]) for r in rows], [[str(r[k]) for k in response_keys] for r in rows])
    pairs = len(response_keys) > 1
    dropped = {IDENTICAL: already_identical, RESPONSE_TOO_LONG: 0} if pairs else {RESPONSE_TOO_LONG: 0}
    kept, cut = [], 0
    for row, f in zip(rows, fitted):
        if f.reason is not None:
            dropped[f.reason] += 1
            continue
        cut += f.cut
        kept.append({**row, "prompt": f.prompt} if f.cut else row)
    report = FitReport(kept, dropped, cut, len(rows) + already_identical)
    limit = f"max_length {fitter.max_length}" + (
        f" and max_prompt_length {fitter.max_prompt_length}" if fitter.max_prompt_length else "")
    check_fit(report, fitter.field, limit, max(f.prompt_tokens for f in fitted), long_prompts, max_dropped_fraction,
              what)
    return report


def fit_messages(rows: list[dict], tokenizer, max_length: int, long_prompts: str, max_dropped_fraction: float,
                 field: str) -> FitReport:
    """Chat rows (``messages``, trained whole by TRL): the oldest turns go (a leading system message stays), each cut
    starting the conversation again at a user message, until the rendered conversation fits ``max_length``. A row whose
    last user message and answer alone do not fit is dropped (``response_too_long``)."""

    def length(messages):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    kept, cut, dropped, longest = [], 0, {RESPONSE_TOO_LONG: 0}, 0
    for row in rows:
        messages = list(row["messages"])
        system = messages[:1] if messages and messages[0].get("role") == "system" else []
        turns = messages[len(system) :]
        starts = [0] + [i for i, m in enumerate(turns) if i and m.get("role") == "user"]
        full = length(messages)
        longest = max(longest, full)
        fits = next((i for i in starts if (full if i == 0 else length(system + turns[i:])) <= max_length), None)
        if fits is None:
            dropped[RESPONSE_TOO_LONG] += 1
            continue
        cut += fits > 0
        kept.append({**row, "messages": system + turns[fits:]} if fits else row)
    report = FitReport(kept, dropped, cut, len(rows))
    check_fit(report, field, f"max_length {max_length}", longest, long_prompts, max_dropped_fraction, "examples")
    return report


def check_fit(report: FitReport, field: str, limit: str, longest: int, long_prompts: str, max_dropped_fraction: float,
              what: str) -> None:
    """Console lines for the prompts cut and the rows dropped. UserError, naming ``field``: a prompt would be cut or a
    row dropped for its length with ``long_prompts: refuse``; more than ``max_dropped_fraction`` of the rows lost; no
    row left. ``limit``: the limits in words, ``longest``: the longest prompt in tokens."""
    from alignment.metrics import console

    total = report.total
    too_long = report.cut + report.dropped.get(RESPONSE_TOO_LONG, 0)
    if too_long and long_prompts == "refuse":
        raise UserError(f"{field}: {too_long} of {total} prompts do not fit {limit} with their answers (the longest "
                        f"prompt has {longest} tokens); raise `max_length`, shorten them, or set "
                        "`long_prompts: truncate`")
    details = ", ".join(f"{REASONS[k]}: {n}" for k, n in report.dropped.items() if n)
    if not report.rows:
        raise UserError(f"{field}: all {total} {what} are dropped ({details}); raise `max_length` or shorten the "
                        "prompts and answers")
    if report.lost > max_dropped_fraction * total:
        raise UserError(f"{field}: {report.lost} of {total} {what} cannot be trained on at {limit} ({details}), "
                        f"more than max_dropped_fraction {max_dropped_fraction}; raise `max_length`, or set "
                        "`max_dropped_fraction` to accept the loss")
    if report.cut:
        console.print(f"[yellow]warning:[/yellow] {field}: {report.cut} of {total} prompts are too long for {limit} "
                      "with their answers: cut from the left (oldest text first; the start token and the answers kept; "
                      "long_prompts: truncate)")
    if report.lost:
        console.print(f"[yellow]warning:[/yellow] {field}: dropped {report.lost} of {total} {what} ({details})")


def fit_prompts(prompts: list[str], tokenizer, max_length: int, field: str) -> tuple[list[str], int]:
    """Online prompts cut from the left to ``max_length`` tokens (their start tokens kept): (prompts, how many cut)."""
    from alignment.metrics import console

    fitted = PromptFitter(tokenizer, max_length, eos=False, field=field).fit(list(prompts), [[] for _ in prompts])
    if any(f.prompt is None for f in fitted):
        raise UserError(f"{field}: {max_length} tokens leave no room for a prompt's start tokens; lower "
                        "`max_new_tokens` or raise `max_prompt_length`")
    cut = sum(f.cut for f in fitted)
    if cut:
        console.print(f"[yellow]warning:[/yellow] {field}: {cut} of {len(prompts)} prompts are longer than "
                      f"{max_length} tokens: cut from the left (oldest text first, the start token kept)")
    return [f.prompt for f in fitted], cut


def fit_pairs(rows: list[dict], cfg, tokenizer, field: str, eos: bool = True, already_identical: int = 0) -> FitReport:
    """``fit_rows`` for prompt/chosen/rejected rows under a training stage's config (``max_length``,
    ``max_prompt_length``, ``long_prompts``, ``max_dropped_fraction``). ``eos``: the trainer appends eos to answers."""
    fitter = PromptFitter(tokenizer, cfg.max_length, cfg.max_prompt_length, eos, field)
    return fit_rows(rows, fitter, ("chosen", "rejected"), cfg.long_prompts, cfg.max_dropped_fraction, already_identical)


def fit_completions(rows: list[dict], cfg, tokenizer, field: str) -> FitReport:
    """``fit_rows`` for prompt/completion rows (SFT, unpaired KTO; the trainer appends eos) under a stage's config."""
    fitter = PromptFitter(tokenizer, cfg.max_length, cfg.max_prompt_length, True, field)
    return fit_rows(rows, fitter, ("completion",), cfg.long_prompts, cfg.max_dropped_fraction, what="examples")
