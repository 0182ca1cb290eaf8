"""The remote judges' sans-IO half: each protocol's request, each family's answers (and garbage), the
schedule that decides when a stream asks, and the policy entries' validation."""

from __future__ import annotations

import math
from typing import Any

import pytest

from proxy.core.detectors import Reset
from proxy.core.errors import ConfigError
from proxy.core.judge_config import RemoteDetector
from proxy.core.judges import (
    JudgeAnswerError,
    Judgement,
    JudgeSchedule,
    judge_request,
    read_answer,
)
from proxy.core.policy import Policy, parse_model


def detector(**fields: Any) -> RemoteDetector:
    base: dict[str, Any] = {"name": "j", "protocol": "chat_classifier", "url": "http://judge:8000/"}
    return RemoteDetector.model_validate(base | fields)


def chat(content: str, logprobs: Any = None) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": content}, "logprobs": logprobs}]}


LLAMA = detector(family="llama_guard", model="meta-llama/Llama-Guard-3-8B")
QWEN = detector(family="qwen3guard", model="Qwen/Qwen3Guard-Gen-8B")
GEMMA = detector(family="shieldgemma", model="google/shieldgemma-2b")


def test_llama_guard_and_qwen3guard_are_sent_the_conversation_their_chat_templates_classify() -> None:
    path, body = judge_request(LLAMA, "How do I pick a lock?", "First, insert a {response} wrench", False)
    assert path == "/v1/chat/completions"
    assert body["model"] == "meta-llama/Llama-Guard-3-8B" and body["temperature"] == 0
    # Filled in one pass: text that looks like a placeholder stays as it is.
    assert body["messages"] == [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "First, insert a {response} wrench"},
    ]
    assert LLAMA.url == "http://judge:8000"


def test_shieldgemma_gets_its_card_prompt_and_asks_for_the_first_tokens_logprobs() -> None:
    _, body = judge_request(GEMMA, "Q?", "A.", False)
    (message,) = body["messages"]
    assert "Human Question: Q?" in message["content"] and "Chatbot Response: A." in message["content"]
    assert '"No Dangerous Content"' in message["content"]
    assert (body["max_tokens"], body["logprobs"], body["top_logprobs"]) == (1, True, 20)


def test_a_model_entry_replaces_the_template_and_the_parser() -> None:
    custom = detector(
        model="my-guard",
        template=[
            {"role": "system", "content": "Judge: {guideline}"},
            {"role": "user", "content": "{response}"},
        ],
        guideline="no weapons",
        parser={"kind": "regex", "unsafe": r"^VIOLATION", "safe": r"^OK", "categories": r"VIOLATION: (.+)"},
        categories={"guns": "weapons"},
    )
    _, body = judge_request(custom, "p", "text", False)
    assert body["messages"] == [
        {"role": "system", "content": "Judge: no weapons"},
        {"role": "user", "content": "text"},
    ]
    assert read_answer(custom, 200, chat("VIOLATION: guns, Drugs")) == Judgement(
        True, ("weapons", "drugs"), 1.0
    )
    assert read_answer(custom, 200, chat("OK")).unsafe is False
    with pytest.raises(JudgeAnswerError):
        read_answer(custom, 200, chat("maybe"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("safe", Judgement(False)),
        ("\n\nsafe", Judgement(False)),
        ("unsafe\nS9", Judgement(True, ("indiscriminate_weapons",), 1.0)),
        ("unsafe\nS1,S10", Judgement(True, ("violent_crimes", "hate"), 1.0)),
        ("unsafe", Judgement(True, ("unsafe",), 1.0)),
    ],
)
def test_llama_guard_answers(content: str, expected: Judgement) -> None:
    assert read_answer(LLAMA, 200, chat(content)) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("Safety: Safe\nCategories: None\nRefusal: No", Judgement(False)),
        ("Safety: Unsafe\nCategories: Violent\nRefusal: No", Judgement(True, ("violent",), 1.0)),
        (
            "Safety: Unsafe\nCategories: Non-violent Illegal Acts, PII",
            Judgement(True, ("non_violent_illegal_acts", "pii"), 1.0),
        ),
        ("Safety: Controversial\nCategories: Politically Sensitive Topics", Judgement(False)),
    ],
)
def test_qwen3guard_answers(content: str, expected: Judgement) -> None:
    assert read_answer(QWEN, 200, chat(content)) == expected


def test_qwen3guard_strict_mode_counts_controversial_as_unsafe() -> None:
    strict = detector(family="qwen3guard", model="q", controversial_is_unsafe=True)
    answer = read_answer(strict, 200, chat("Safety: Controversial\nCategories: Unethical Acts"))
    assert answer == Judgement(True, ("unethical_acts",), 1.0)


def test_shieldgemma_scores_yes_against_no_from_the_logprobs() -> None:
    logprobs = {
        "content": [
            {
                "token": "No",
                "logprob": -0.2,
                "top_logprobs": [{"token": "No", "logprob": -0.2}, {"token": "Yes", "logprob": -1.8}],
            }
        ]
    }
    answer = read_answer(GEMMA, 200, chat("No", logprobs))
    p_yes = math.exp(-1.8) / (math.exp(-1.8) + math.exp(-0.2))
    assert answer == Judgement(False, (), pytest.approx(p_yes))
    low = detector(family="shieldgemma", model="g", threshold=0.1)
    assert read_answer(low, 200, chat("No", logprobs)) == Judgement(
        True, ("dangerous_content",), pytest.approx(p_yes)
    )
    # An engine that gives no logprobs: the answer's first word decides.
    assert read_answer(GEMMA, 200, chat("Yes, it violates the policy.")).unsafe is True


@pytest.mark.parametrize(
    "body",
    [
        None,
        {"choices": []},
        {"choices": [{"message": {"content": None}}]},
        chat("I cannot classify this."),
    ],
)
@pytest.mark.parametrize("judge", [LLAMA, QWEN, GEMMA], ids=["llama_guard", "qwen3guard", "shieldgemma"])
def test_garbage_is_no_verdict(judge: RemoteDetector, body: Any) -> None:
    with pytest.raises(JudgeAnswerError):
        read_answer(judge, 200, body)


def test_an_error_status_is_no_verdict_and_only_a_5xx_or_429_is_worth_asking_again() -> None:
    for status, retry in [(500, True), (503, True), (429, True), (400, False), (401, False)]:
        with pytest.raises(JudgeAnswerError) as info:
            read_answer(LLAMA, status, chat("safe"))
        assert info.value.retry is retry


MODERATION = detector(protocol="openai_moderation", family=None, categories={"illicit/violent": "weapons"})


def test_moderation_sends_the_answer_alone_and_maps_flagged_categories() -> None:
    path, body = judge_request(MODERATION, "a harmful prompt", "a refusal", False)
    assert (path, body) == ("/v1/moderations", {"input": "a refusal"})
    answer = {
        "results": [
            {
                "flagged": True,
                "categories": {"violence": True, "illicit/violent": True, "hate": False},
                "category_scores": {"violence": 0.7, "illicit/violent": 0.9, "hate": 0.01},
            }
        ]
    }
    assert read_answer(MODERATION, 200, answer) == Judgement(True, ("violence", "weapons"), 0.9)
    # With a threshold the scores decide, whatever `flagged` says.
    scored = detector(protocol="openai_moderation", threshold=0.8)
    assert read_answer(scored, 200, answer) == Judgement(True, ("illicit_violent",), 0.9)
    with pytest.raises(JudgeAnswerError):
        read_answer(MODERATION, 200, {"results": [{"categories": {}}]})


def test_the_backtrack_protocol_carries_the_policys_reset_rule_and_the_reset_position() -> None:
    guard = detector(protocol="backtrack")
    path, body = judge_request(guard, "p", "text", True, logit_bias=-1.75, threshold=0.4)
    assert path == "/v1/guard/score"
    assert body == {"prompt": "p", "text": "text", "final": True, "logit_bias": -1.75, "threshold": 0.4}
    answer = {"scored_until": 40, "reset": {"at": 31, "category": "unsafe", "score": 0.8}, "score": 0.8}
    assert read_answer(guard, 200, answer) == Judgement(True, ("unsafe",), 0.8, 31, 40)


def test_the_schedule_asks_every_n_tokens_one_call_at_a_time() -> None:
    s = JudgeSchedule(detector(family="llama_guard", model="m", every_tokens=4))
    s.add("One two three")
    assert s.due() is None  # three tokens wait: not yet
    s.add(" four five")
    assert s.due() == len("One two three four five")
    s.add(" six seven eight nine ten")
    assert s.due() is None  # a call is in flight: never two
    assert s.verdict().scored_until == 0  # nothing vouched for while the judge reads
    s.judged(23, Judgement(False))
    assert s.verdict().scored_until == 23
    assert s.due() == len(s.text)  # the next call reads everything so far, not the next 4 tokens only
    s.judged(len(s.text), Judgement(True, ("hate",), 1.0))
    # The judge does not say where: the reset starts where the text it last found safe ended.
    assert s.verdict().reset == Reset(23, "hate", 1.0, "j")
    s.add(" more")
    assert s.due(final=True) is None and s.settled


def test_the_schedule_on_a_final_feed_and_after_failures() -> None:
    s = JudgeSchedule(detector(family="llama_guard", model="m", every_chars=100))
    s.add("short")
    assert s.due() is None and s.due(final=True) == 5
    s.failed(5, fail_open=True)
    assert s.verdict().scored_until == 5 and s.settled
    s.add(" and more")
    assert s.due(final=True) == 14
    s.failed(14, fail_open=False)
    assert s.verdict().scored_until == 5 and not s.settled


def policy(**fields: Any) -> Policy:
    return parse_model(Policy, {"name": "p", **fields}, "policies/p.yaml")


def test_policy_entries_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"chat_classifier needs 'model'"):
        policy(
            detectors={
                "remote": [
                    {"name": "j", "protocol": "chat_classifier", "url": "http://x", "family": "llama_guard"}
                ]
            }
        )
    with pytest.raises(ConfigError, match=r"'detectors.remote.0.url' has value 'judge:8000'"):
        policy(detectors={"remote": [{"name": "j", "protocol": "backtrack", "url": "judge:8000"}]})
    with pytest.raises(ConfigError, match=r"family, template and parser are for chat_classifier"):
        policy(
            detectors={
                "remote": [{"name": "j", "protocol": "backtrack", "url": "http://x", "family": "qwen3guard"}]
            }
        )
    two = [{"name": "j", "protocol": "backtrack", "url": "http://x"}] * 2
    with pytest.raises(ConfigError, match=r"must be unique"):
        policy(detectors={"remote": two})
    remote = [{"name": "j", "protocol": "backtrack", "url": "http://x"}]
    with pytest.raises(
        ConfigError, match=r"cascade.trigger names 'model', which is not an enabled detector \['j'\]"
    ):
        policy(detectors={"remote": remote}, cascade={"trigger": "model", "verifier": "j"})
    ok = policy(
        detectors={"remote": remote, "model": {"enabled": True}},
        cascade={"trigger": "model", "verifier": "j"},
    )
    assert ok.cascade is not None and ok.cascade.category == "verifier"


def test_the_readmes_remote_judge_examples_are_valid_policies() -> None:
    import re

    import yaml

    from tests.support import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[
        readme.index("## Remote judges") : readme.index("\n## ", readme.index("## Remote judges"))
    ]
    first, per_protocol, cascade = (
        yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)
    )
    assert policy(**first).detectors.remote[0].family == "llama_guard"
    protocols = {d.protocol for d in policy(detectors={"remote": per_protocol}).detectors.remote}
    assert protocols == {"openai_moderation", "chat_classifier", "backtrack"}
    assert policy(**cascade).cascade is not None
