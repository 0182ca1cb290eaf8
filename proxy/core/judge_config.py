"""A policy's remote detectors: a judge behind HTTP, and how to ask it (`detectors.remote` entries).

Three wire protocols (`proxy.core.judges` builds their requests and reads their answers):

    openai_moderation   POST {url}/v1/moderations: OpenAI's moderation API, or a server speaking it
    chat_classifier     POST {url}/v1/chat/completions: a safety model on an OpenAI-compatible engine
                        (vLLM, TGI, Ollama...), asked with its family's prompt template and read by its
                        family's output parser: `llama_guard` (3 and 4), `qwen3guard` (Qwen3Guard-Gen),
                        `shieldgemma` (the Yes/No probability from logprobs where the engine gives them)
    backtrack           POST {url}/v1/guard/score: another Backtrack's guard (`backtrack guard-serve`)

Secrets never live here: `api_key_env` names the environment variable that holds the key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROTOCOLS = ("openai_moderation", "chat_classifier", "backtrack")
FAMILIES = ("llama_guard", "qwen3guard", "shieldgemma")
# Stage names a cascade may use besides the remote detectors' own names.
LOCAL_STAGES = frozenset({"model", "patterns", "marker"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TemplateMessage(_Frozen):
    """One chat message of a prompt template; `{prompt}`, `{response}` and `{guideline}` are filled in."""

    role: Literal["system", "user", "assistant"]
    content: str


class ParserSpec(_Frozen):
    """How a chat classifier's answer is read: a shipped family's parser, or three regular expressions.

    `regex`: the answer is unsafe where `unsafe` matches, safe where `safe` matches (neither: not an
    answer, the policy's fail mode applies); `categories` (one group: a comma-separated list) names them.
    """

    kind: Literal["llama_guard", "qwen3guard", "shieldgemma", "regex"]
    unsafe: str | None = None
    safe: str | None = None
    categories: str | None = None

    @model_validator(mode="after")
    def _regex(self) -> ParserSpec:
        import re

        if self.kind == "regex" and (self.unsafe is None or self.safe is None):
            raise ValueError("a 'regex' parser needs both 'unsafe' and 'safe' patterns")
        for rx in (self.unsafe, self.safe, self.categories):
            if rx is not None:
                try:
                    re.compile(rx)
                except re.error as exc:
                    raise ValueError(f"regex {rx!r} does not compile: {exc}") from None
        return self


class RemoteDetector(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")  # a metric label: short and plain
    protocol: Literal["openai_moderation", "chat_classifier", "backtrack"]
    url: str  # the judge's root; the protocol's path goes under it
    api_key_env: str | None = None  # the variable holding the judge's key, sent as a Bearer token
    model: str | None = None  # the `model` field of the request (required by chat_classifier)
    family: Literal["llama_guard", "qwen3guard", "shieldgemma"] | None = None
    template: list[TemplateMessage] | None = None  # replaces the family's prompt template
    parser: ParserSpec | None = None  # replaces the family's parser
    # ShieldGemma's principle (`{guideline}` in its template) and the category its "Yes" means.
    guideline: str | None = None
    # The judge's category names or codes (S1, "Violent", "illicit/violent") -> the policy's categories;
    # an unmapped one becomes its lower-case slug ("Non-violent Illegal Acts" -> non_violent_illegal_acts).
    categories: dict[str, str] = {}
    # How often the judge reads the text so far: every N guard tokens, or every N characters when set.
    every_tokens: int = Field(16, ge=1, le=4096)
    every_chars: int | None = Field(None, ge=1, le=65536)
    # Where the judge gives a probability (moderation scores, ShieldGemma, backtrack): unsafe at or above.
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    timeout_seconds: float = Field(2.0, gt=0.0, le=60.0)  # one attempt
    retries: int = Field(1, ge=0, le=5)  # further attempts after a timeout, a refused connection or a 5xx
    max_concurrency: int = Field(64, ge=1, le=4096)  # calls in flight to this judge, all streams together
    # Qwen3Guard's third verdict: `Controversial` counts as unsafe only when this is set (its strict mode).
    controversial_is_unsafe: bool = False

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _complete(self) -> RemoteDetector:
        if self.protocol == "chat_classifier":
            if self.model is None:
                raise ValueError(f"detector {self.name!r}: chat_classifier needs 'model'")
            if self.family is None and (self.template is None or self.parser is None):
                raise ValueError(
                    f"detector {self.name!r}: chat_classifier needs 'family' ({', '.join(FAMILIES)}), "
                    "or both 'template' and 'parser'"
                )
        elif self.family or self.template or self.parser:
            raise ValueError(f"detector {self.name!r}: family, template and parser are for chat_classifier")
        return self
