"""Policies: what to detect, how long to hold text back, and what to do on a reset.

A policy is a frozen, validated object loaded from YAML (`policies/*.yaml`). The engine and the stream
shell read it; nothing mutates it, so a reload swaps whole policies while streams in flight keep theirs.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.core.detectors import MARKER, UPSTREAM_RESET
from proxy.core.errors import ConfigError
from proxy.core.judge_config import LOCAL_STAGES, RemoteDetector

M = TypeVar("M", bound=BaseModel)


class Action(StrEnum):
    REFUSE = "refuse"  # drop the held text, answer with the policy's refusal message
    REGENERATE = "regenerate"  # ask the upstream again with a safety instruction, guarded in turn
    # Ask again with the dropped text and `[RESET]` as the answer's start (for backtracking-trained
    # upstreams, which then write their own safe continuation); `regenerate` where there is no prefill.
    INJECT = "inject"
    TRUNCATE = "truncate"  # end the response here with finish_reason "content_filter"
    FLAG = "flag"  # let the text through; record the event only
    CONTINUE = "continue"  # the upstream reset itself: what follows its marker is the continuation


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MarkerDetector(_Frozen):
    enabled: bool = True
    token: str = Field(MARKER, min_length=1)


class PatternRule(_Frozen):
    category: str = Field(min_length=1)
    regex: list[str] = []
    words: list[str] = []

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        import re

        for rx in value:
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"regex {rx!r} does not compile: {exc}") from None
        return value


class ModelDetector(_Frozen):
    enabled: bool = False


class Detectors(_Frozen):
    marker: MarkerDetector = MarkerDetector()
    patterns: list[PatternRule] = []
    model: ModelDetector = ModelDetector()
    # Judges behind HTTP (`proxy.core.judges`): read side by side with the others, or as a cascade's stage.
    remote: list[RemoteDetector] = []

    @field_validator("remote")
    @classmethod
    def _unique(cls, value: list[RemoteDetector]) -> list[RemoteDetector]:
        names = [d.name for d in value]
        dup = sorted({n for n in names if names.count(n) > 1} | {n for n in names if n in LOCAL_STAGES})
        if dup:
            raise ValueError(f"detector names must be unique and not one of {sorted(LOCAL_STAGES)}: {dup}")
        return value


class Cascade(_Frozen):
    """Two stages: the `trigger`'s resets are candidates, each judged by the `verifier` (over the prompt
    and the text so far) before it becomes a reset. Unsafe confirms it; safe dismisses it, and the trigger
    reads on from there. Stages are detector names: `model`, `patterns` or a remote detector's name."""

    trigger: str = Field(min_length=1)
    verifier: str = Field(min_length=1)
    # Which stage's category a confirmed reset carries (the verifier usually names harms more finely).
    category: Literal["verifier", "trigger"] = "verifier"

    @model_validator(mode="after")
    def _two(self) -> Cascade:
        if self.trigger == self.verifier:
            raise ValueError("a cascade's trigger and verifier must be two different detectors")
        return self


class Strikes(_Frozen):
    """After `limit` resets of one tenant within `window_seconds` (counted across replicas), its
    requests get the policy `escalate_to` instead, or a 429 with `Retry-After` when `reject` is set."""

    window_seconds: float = Field(gt=0.0, le=86400.0)
    limit: int = Field(ge=1, le=100_000)
    escalate_to: str | None = Field(None, min_length=1)
    reject: bool = False

    @model_validator(mode="after")
    def _one_outcome(self) -> Strikes:
        if (self.escalate_to is None) == (not self.reject):
            raise ValueError("strikes needs exactly one of 'escalate_to: POLICY' or 'reject: true'")
        return self


class Policy(_Frozen):
    name: str = Field(min_length=1)
    description: str = ""
    detectors: Detectors = Detectors()
    # Added to the guard's reset logit before the threshold: the paper's knob (negative = fewer resets).
    logit_bias: float = Field(0.0, ge=-20.0, le=20.0)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    # 24 guard tokens by default; CARE's rollback used 40. More hold-back catches more before release.
    holdback_tokens: int = Field(24, ge=0, le=4096)
    score_every_tokens: int = Field(1, ge=1, le=256)
    actions: dict[str, Action] = {"default": Action.REFUSE, UPSTREAM_RESET: Action.CONTINUE}
    refusal_message: str = "I can't help with that."
    # Per category, what `refuse` answers instead of `refusal_message` (e.g. point self-harm to help).
    messages: dict[str, str] = {}
    regenerate_instruction: str = (
        "Your previous answer was withdrawn because it was unsafe. Answer again safely: "
        "decline harmful requests briefly and help with anything benign."
    )
    max_resets: int = Field(2, ge=0, le=10)
    # What a client that ignores the reset event sees when a reset retracts text it was shown:
    # `event` (the continuation follows the shown text, spliced), `notice` (`retraction_notice` in the
    # text between them) or `cut` (the answer ends with content_filter). `notice` by default: most
    # wrappers and chat UIs ignore the event, and the notice tells their users that the text above is
    # withdrawn while the safe continuation still arrives; mending clients skip it (`notice_chars`).
    retraction: Literal["event", "notice", "cut"] = "notice"
    retraction_notice: str = Field("\n\n[The answer above was withdrawn.]\n\n", min_length=1)
    fail_mode: Literal["open", "closed"] = "open"
    guard_timeout_seconds: float = Field(2.0, gt=0.0, le=60.0)
    score_prompt: bool = True  # give the guard the prompt as context
    score_prefill: bool = True  # client-supplied assistant text is part of the response the guard reads
    audit: Literal["redacted", "kept"] = "redacted"
    strikes: Strikes | None = None  # None: a tenant's resets never change what it gets
    cascade: Cascade | None = None  # None: every detector's reset is a reset

    @model_validator(mode="after")
    def _stages(self) -> Policy:
        if self.cascade is None:
            return self
        d = self.detectors
        known = {"model": d.model.enabled, "patterns": bool(d.patterns)} | {r.name: True for r in d.remote}
        for role in ("trigger", "verifier"):
            name = getattr(self.cascade, role)
            if not known.get(name):
                enabled = sorted(n for n, on in known.items() if on)
                raise ValueError(f"cascade.{role} names {name!r}, which is not an enabled detector {enabled}")
        return self

    @field_validator("actions")
    @classmethod
    def _actions(cls, actions: dict[str, Action]) -> dict[str, Action]:
        # A field validator, so that errors name 'actions' and show its value.
        if "default" not in actions:
            raise ValueError("must have a 'default' entry")
        for category, action in actions.items():
            if action is Action.CONTINUE and category != UPSTREAM_RESET:
                raise ValueError(f"'continue' is only for {UPSTREAM_RESET!r}, not for {category!r}")
        return actions

    def action_for(self, category: str) -> Action:
        return self.actions.get(category, self.actions["default"])

    def message_for(self, category: str) -> str:
        """What `refuse` answers for a reset of this category."""
        return self.messages.get(category, self.refusal_message)


# Keys whose values are secrets, or may be when mistyped (a key pasted where its digest belongs): an
# error names the key but never repeats the value.
SECRET_KEYS = frozenset({"api_key", "key_sha256"})


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem: file, key path, offending value, reason."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        if isinstance(value, dict):
            shown = ""
        elif SECRET_KEYS.intersection(str(p) for p in err["loc"]):
            shown = " has a value that is not shown (a secret)."
        else:
            shown = f" has value {value!r}."
        lines.append(f"{source}: '{path}'{shown} {err['msg']}")
    return "\n".join(lines)


def parse_model(model: type[M], data: Any, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_policy(path: Path) -> Policy:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a policy must be a mapping of keys to values")
    data.setdefault("name", path.stem)
    return parse_model(Policy, data, str(path))
