"""Remote judges, sans-IO: what to send each protocol, how to read its answer, and when to ask.

`judge_request(detector, prompt, text, final)` gives the path and JSON body of one call;
`read_answer(detector, status, body)` turns the judge's answer into a `Judgement`, or raises
`JudgeAnswerError` for an answer that is not one (garbage, an error status). The HTTP client that sends
them lives at the server edge (`proxy.server.judges`).

`JudgeSchedule` is one stream's bookkeeping for one detector: the text fed so far, how far the judge has
vouched for it, the one call in flight (never more), and the reset once a judge found one. A judge reads
the prompt and the whole text so far; it says "unsafe" without saying where, so a reset starts where
the last "safe" ended (the first character no judge vouched for). The `backtrack` protocol names the
token, as the in-process guard does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from proxy.core.detectors import Reset, Verdict
from proxy.core.errors import ClientError, GuardError
from proxy.core.judge_config import ParserSpec, RemoteDetector, TemplateMessage
from proxy.core.tokens import ApproxTokenizer

MODERATION_PATH = "/v1/moderations"
CHAT_PATH = "/v1/chat/completions"
GUARD_PATH = "/v1/guard/score"

# ShieldGemma's response-classification prompt, as its model card gives it.
SHIELDGEMMA_PROMPT = """\
You are a policy expert trying to help determine whether an AI response to prompt is in violation of the \
defined safety policies.

<start_of_turn>
Human Question: {prompt}
<end_of_turn>

<start_of_turn>
Chatbot Response: {response}
<end_of_turn>

Our safety principle is defined in the below:

* {guideline}

Does the Chatbot Response violate the above principle? Your answer must start with 'Yes' or 'No'. And then \
walk through step by step to be sure we answer correctly.
"""
SHIELDGEMMA_GUIDELINE = (
    '"No Dangerous Content": The chatbot shall not generate content that harming oneself and/or others '
    "(e.g., accessing or building firearms and explosive devices, promotion of terrorism, instructions "
    "for suicide)."
)
SHIELDGEMMA_CATEGORY = "dangerous_content"

# Llama Guard and Qwen3Guard-Gen carry their classification prompt in their chat templates: the engine
# applies it to the conversation, so the judge is sent the conversation itself.
CONVERSATION = (
    TemplateMessage(role="user", content="{prompt}"),
    TemplateMessage(role="assistant", content="{response}"),
)
TEMPLATES: dict[str, tuple[TemplateMessage, ...]] = {
    "llama_guard": CONVERSATION,
    "qwen3guard": CONVERSATION,
    "shieldgemma": (TemplateMessage(role="user", content=SHIELDGEMMA_PROMPT),),
}

# Llama Guard 3 and 4's hazard taxonomy (MLCommons), code -> category.
LLAMA_GUARD_CATEGORIES = {
    "S1": "violent_crimes", "S2": "non_violent_crimes", "S3": "sex_crimes", "S4": "child_exploitation",
    "S5": "defamation", "S6": "specialized_advice", "S7": "privacy", "S8": "intellectual_property",
    "S9": "indiscriminate_weapons", "S10": "hate", "S11": "self_harm", "S12": "sexual_content",
    "S13": "elections", "S14": "code_interpreter_abuse",
}  # fmt: skip
UNSAFE = "unsafe"  # the category of an unsafe verdict that names none


class JudgeAnswerError(GuardError):
    """The judge answered, but not with a verdict (garbage, an error status, the wrong shape).

    `retry` says whether asking again may help (a 5xx or a 429)."""

    def __init__(self, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True, slots=True)
class Judgement:
    unsafe: bool
    categories: tuple[str, ...] = ()
    score: float = 0.0  # the judge's probability of unsafe, where it gives one (else 1.0 or 0.0)
    at: int | None = None  # where the unsafe text starts, where the judge says (backtrack only)
    scored_until: int | None = None  # how far the judge vouched (backtrack; else the whole text)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or UNSAFE


def policy_category(detector: RemoteDetector, name: str, default: dict[str, str] | None = None) -> str:
    if name in detector.categories:
        return detector.categories[name]
    return (default or {}).get(name) or slug(name)


# -- requests ----------------------------------------------------------------------------------------


def judge_request(
    detector: RemoteDetector,
    prompt: str | None,
    text: str,
    final: bool,
    logit_bias: float = 0.0,
    threshold: float = 0.5,
) -> tuple[str, dict[str, Any]]:
    """The path (under the detector's url) and JSON body of one call judging `prompt` and `text`.

    `logit_bias` and `threshold` are the policy's, for a `backtrack` guard (the detector's own
    `threshold` wins)."""
    if detector.protocol == "openai_moderation":
        # The answer alone: a harmful prompt the answer refuses must not reset the refusal.
        body: dict[str, Any] = {"input": text}
        if detector.model:
            body["model"] = detector.model
        return MODERATION_PATH, body
    if detector.protocol == "backtrack":
        body = {
            "prompt": prompt,
            "text": text,
            "final": final,
            "logit_bias": logit_bias,
            "threshold": detector.threshold or threshold,
        }
        return GUARD_PATH, body
    family = detector.family
    template = detector.template or TEMPLATES[family or "llama_guard"]
    values = {
        "{prompt}": prompt or "",
        "{response}": text,
        "{guideline}": detector.guideline or SHIELDGEMMA_GUIDELINE,
    }
    messages = [{"role": m.role, "content": _fill(m.content, values)} for m in template]
    body = {"model": detector.model, "messages": messages, "temperature": 0, "stream": False}
    if _parser(detector).kind == "shieldgemma":
        # One token is the answer; its Yes/No probability is the score where the engine gives logprobs.
        body |= {"max_tokens": 1, "logprobs": True, "top_logprobs": 20}
    else:
        body["max_tokens"] = 32
    return CHAT_PATH, body


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass, so text that happens to contain "{response}" is not filled in again.
    return re.sub(r"\{prompt\}|\{response\}|\{guideline\}", lambda m: values[m.group()], template)


def _parser(detector: RemoteDetector) -> ParserSpec:
    return detector.parser or ParserSpec(kind=detector.family or "llama_guard")


# -- answers -----------------------------------------------------------------------------------------


def read_answer(detector: RemoteDetector, status: int, body: Any) -> Judgement:
    """The verdict in a judge's answer (`body`: the parsed JSON, or None when it was not JSON)."""
    if status != 200:
        raise JudgeAnswerError(f"judge answered HTTP {status}", retry=status >= 500 or status == 429)
    if not isinstance(body, dict):
        raise JudgeAnswerError("judge answered something that is not a JSON object")
    if detector.protocol == "openai_moderation":
        return _moderation(detector, body)
    if detector.protocol == "backtrack":
        return _backtrack(body)
    return _chat(detector, body)


def _moderation(detector: RemoteDetector, body: dict[str, Any]) -> Judgement:
    results = body.get("results")
    if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
        raise JudgeAnswerError("moderation answer has no 'results'")
    flagged_any, names, top = False, [], 0.0
    for result in results:
        flags, scores = result.get("categories", {}), result.get("category_scores", {})
        if not isinstance(result.get("flagged"), bool) or not isinstance(flags, dict):
            raise JudgeAnswerError("moderation result lacks 'flagged' or 'categories'")
        if not isinstance(scores, dict) or not all(isinstance(v, int | float) for v in scores.values()):
            raise JudgeAnswerError("moderation result has non-numeric 'category_scores'")
        top = max([top, *map(float, scores.values())])
        if detector.threshold is not None:
            hits = [name for name, score in scores.items() if score >= detector.threshold]
        else:
            hits = [name for name, on in flags.items() if on is True] if result["flagged"] else []
        flagged_any = flagged_any or bool(hits) or (detector.threshold is None and result["flagged"])
        names += hits
    categories = tuple(dict.fromkeys(policy_category(detector, n) for n in names))
    return Judgement(
        flagged_any, categories or ((UNSAFE,) if flagged_any else ()), top if top else float(flagged_any)
    )


def _backtrack(body: dict[str, Any]) -> Judgement:
    until, reset, score = body.get("scored_until"), body.get("reset"), body.get("score", 0.0)
    if not isinstance(until, int) or not isinstance(score, int | float):
        raise JudgeAnswerError("guard answer lacks 'scored_until' or 'score'")
    if reset is None:
        return Judgement(False, (), float(score), None, until)
    if not isinstance(reset, dict) or not isinstance(reset.get("at"), int):
        raise JudgeAnswerError("guard answer's 'reset' lacks 'at'")
    category = reset.get("category", UNSAFE)
    return Judgement(True, (str(category),), float(reset.get("score", score)), reset["at"], until)


def _chat(detector: RemoteDetector, body: dict[str, Any]) -> Judgement:
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeAnswerError("chat answer has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise JudgeAnswerError("chat answer's content is not text")
    spec = _parser(detector)
    if spec.kind == "llama_guard":
        return _llama_guard(detector, content)
    if spec.kind == "qwen3guard":
        return _qwen3guard(detector, content)
    if spec.kind == "shieldgemma":
        return _shieldgemma(detector, content, choice.get("logprobs"))
    return _regex(detector, spec, content)


def _llama_guard(detector: RemoteDetector, content: str) -> Judgement:
    lines = [line.strip() for line in content.strip().splitlines() if line.strip()]
    if lines and lines[0] == "safe":
        return Judgement(False, (), 0.0)
    if lines and lines[0] == "unsafe":
        codes = [c.strip() for c in lines[1].split(",") if c.strip()] if len(lines) > 1 else []
        names = tuple(dict.fromkeys(policy_category(detector, c, LLAMA_GUARD_CATEGORIES) for c in codes))
        return Judgement(True, names or (UNSAFE,), 1.0)
    raise JudgeAnswerError("Llama Guard answer is neither 'safe' nor 'unsafe'")


_QWEN_SAFETY = re.compile(r"Safety:\s*(Safe|Unsafe|Controversial)\b")
_QWEN_CATEGORIES = re.compile(r"Categories:\s*(.+)")


def _qwen3guard(detector: RemoteDetector, content: str) -> Judgement:
    m = _QWEN_SAFETY.search(content)
    if m is None:
        raise JudgeAnswerError("Qwen3Guard answer has no 'Safety: Safe|Unsafe|Controversial' line")
    label = m.group(1)
    unsafe = label == "Unsafe" or (label == "Controversial" and detector.controversial_is_unsafe)
    if not unsafe:
        return Judgement(False, (), 0.0)
    c = _QWEN_CATEGORIES.search(content)
    names = [n.strip() for n in c.group(1).split(",")] if c else []
    categories = tuple(dict.fromkeys(policy_category(detector, n) for n in names if n and n != "None"))
    return Judgement(True, categories or (UNSAFE,), 1.0)


def _shieldgemma(detector: RemoteDetector, content: str, logprobs: Any) -> Judgement:
    category = policy_category(detector, SHIELDGEMMA_CATEGORY)
    threshold = detector.threshold or 0.5
    p_yes = _yes_probability(logprobs)
    if p_yes is None:
        # No logprobs from this engine: the answer's first word is the verdict, its score 0 or 1.
        word = content.strip().split(maxsplit=1)[0].strip(".,:").lower() if content.strip() else ""
        if word not in ("yes", "no"):
            raise JudgeAnswerError("ShieldGemma answer starts with neither 'Yes' nor 'No'")
        p_yes = 1.0 if word == "yes" else 0.0
    unsafe = p_yes >= threshold
    return Judgement(unsafe, (category,) if unsafe else (), p_yes)


def _yes_probability(logprobs: Any) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) over the first token's alternatives, as ShieldGemma's card scores it."""
    try:
        first = logprobs["content"][0]
        alternatives = [first, *first.get("top_logprobs", [])]
    except (KeyError, IndexError, TypeError):
        return None
    best: dict[str, float] = {}
    for alt in alternatives:
        if not isinstance(alt, dict) or not isinstance(alt.get("logprob"), int | float):
            continue
        word = str(alt.get("token", "")).strip().lower()
        if word in ("yes", "no"):
            best[word] = max(best.get(word, -math.inf), float(alt["logprob"]))
    if "yes" not in best and "no" not in best:
        return None
    yes, no = math.exp(best.get("yes", -math.inf)), math.exp(best.get("no", -math.inf))
    return yes / (yes + no)


def _regex(detector: RemoteDetector, spec: ParserSpec, content: str) -> Judgement:
    assert spec.unsafe is not None and spec.safe is not None  # the spec's validator requires them
    if re.search(spec.unsafe, content):
        c = re.search(spec.categories, content) if spec.categories else None
        names = [n.strip() for n in c.group(1).split(",")] if c and c.groups() else []
        categories = tuple(dict.fromkeys(policy_category(detector, n) for n in names if n))
        return Judgement(True, categories or (UNSAFE,), 1.0)
    if re.search(spec.safe, content):
        return Judgement(False, (), 0.0)
    raise JudgeAnswerError("judge answer matches neither the parser's 'unsafe' nor its 'safe' pattern")


# -- when to ask -------------------------------------------------------------------------------------


class JudgeSchedule:
    """One stream's calls to one judge (see the module docstring). No I/O: the shell asks `due()` for
    the text to send, sends it, and reports back with `judged()` or `failed()`."""

    def __init__(self, detector: RemoteDetector) -> None:
        self.detector = detector
        self.tokenizer = ApproxTokenizer()
        self.text = ""
        self.vouched = 0  # the judge found text[:vouched] safe (or failed open on it)
        self.asked: int | None = None  # the end of the text the call in flight judges
        self.reset: Reset | None = None
        self.score = 0.0

    def add(self, text: str) -> None:
        self.text += text

    def due(self, final: bool = False) -> int | None:
        """The end of the text the next call should judge, or None: a call is in flight, a reset is
        known, or too little new text waits (any at all, when `final`). Marks the call as in flight."""
        if self.asked is not None or self.reset is not None or len(self.text) <= self.vouched:
            return None
        if not final:
            pending = self.text[self.vouched :]
            d = self.detector
            if d.every_chars is not None:
                if len(pending) < d.every_chars:
                    return None
            elif len(self.tokenizer.token_starts(pending)) < d.every_tokens:
                return None
        self.asked = len(self.text)
        return self.asked

    def judged(self, end: int, judgement: Judgement) -> None:
        """The call that judged `text[:end]` answered."""
        self.asked = None
        self.score = max(self.score, judgement.score)
        if judgement.unsafe:
            at = self.vouched if judgement.at is None else judgement.at
            category = judgement.categories[0] if judgement.categories else UNSAFE
            self.reset = Reset(at, category, judgement.score, self.detector.name)
        else:
            until = end if judgement.scored_until is None else min(end, judgement.scored_until)
            self.vouched = max(self.vouched, until)

    def failed(self, end: int, fail_open: bool) -> None:
        """The call that judged `text[:end]` failed for good; failing open vouches for that text."""
        self.asked = None
        if fail_open:
            self.vouched = max(self.vouched, end)

    def verdict(self) -> Verdict:
        if self.reset is not None:
            return Verdict(len(self.text), self.reset, self.score)
        return Verdict(self.vouched, None, self.score)

    @property
    def settled(self) -> bool:
        """Everything fed is judged (or a reset is known): a final feed needs no further call."""
        return self.reset is not None or self.vouched >= len(self.text)


# -- the `backtrack` protocol, served (`backtrack guard-serve`) ---------------------------------------


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    prompt: str | None
    text: str
    final: bool
    logit_bias: float
    threshold: float


def read_score_request(body: Any) -> ScoreRequest:
    """A `POST /v1/guard/score` body, checked; raises `ClientError` naming the field that is wrong."""
    if not isinstance(body, dict):
        raise ClientError("the body must be a JSON object")
    prompt, text = body.get("prompt"), body.get("text")
    final, bias, threshold = body.get("final", True), body.get("logit_bias", 0.0), body.get("threshold", 0.5)
    if prompt is not None and not isinstance(prompt, str):
        raise ClientError("'prompt' must be a string or null")
    if not isinstance(text, str):
        raise ClientError("'text' must be a string")
    if not isinstance(final, bool):
        raise ClientError("'final' must be true or false")
    if isinstance(bias, bool) or not isinstance(bias, int | float) or not -20.0 <= bias <= 20.0:
        raise ClientError("'logit_bias' must be a number from -20 to 20")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold < 1.0:
        raise ClientError("'threshold' must be a number between 0 and 1")
    return ScoreRequest(prompt, text, final, float(bias), float(threshold))


def score_answer(verdict: Verdict) -> dict[str, Any]:
    """The JSON answer to a score request: what `read_answer` reads back for the `backtrack` protocol."""
    r = verdict.reset
    reset = None if r is None else {"at": r.at, "category": r.category, "score": r.score}
    return {"scored_until": verdict.scored_until, "reset": reset, "score": verdict.score}
