"""Policy selection, sans-IO: which policy a request gets, step by step through the precedence.

1. X-Backtrack-Policy, where the tenant may choose it   2. rules (tenant's, then top-level)
3. the tenant's policy                                   4. default_policy
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from proxy.cli.main import main
from proxy.core.errors import ClientError, Forbidden, Unauthorized
from proxy.core.policy import Policy
from proxy.core.selection import PolicySet, Rule, Selector, Tenant, hash_key, presented_key
from tests.harness import BENIGN, Harness, replay_stats

POLICIES = {name: Policy(name=name) for name in ("default", "strict", "permissive", "internal")}

ACME = Tenant(
    name="acme",
    key_sha256=[hash_key("sk-acme-old"), hash_key("sk-acme")],
    policy="permissive",
    allowed_policies=["strict", "default"],
    rules=[Rule(model="acme-*", policy="internal")],
)
GLOBEX = Tenant(name="globex", key_sha256=[hash_key("sk-globex")])
RULES = (
    Rule(model="*-uncensored*", policy="strict"),
    Rule(route="/v1/completions", policy="strict"),
    Rule(model="acme-7b", route="/api/*", policy="default"),
)


def selector(*tenants: Tenant, anonymous: tuple[str, ...] = ()) -> Selector:
    return Selector(PolicySet(POLICIES, "default", tenants, RULES, anonymous))


def choose(sel: Selector, key: str | None, model: str = "llama-3", route: str = "/v1/chat/completions",
           requested: str | None = None) -> tuple[str, str]:  # fmt: skip
    choice = sel.choose(sel.authenticate(key), model, route, requested)
    return choice.policy.name, choice.reason


def test_without_tenants_every_request_is_anonymous_and_gets_the_default() -> None:
    sel = selector()

    assert sel.authenticate(None) is None
    assert sel.authenticate("sk-anything") is None  # no keys configured: a client's key is not ours
    assert choose(sel, None) == ("default", "default")


def test_with_tenants_a_missing_or_unknown_key_is_refused_with_401() -> None:
    sel = selector(ACME)

    with pytest.raises(Unauthorized) as missing:
        sel.authenticate(None)
    with pytest.raises(Unauthorized) as unknown:
        sel.authenticate("sk-guess")

    assert missing.value.status == unknown.value.status == 401
    assert "needs an API key" in missing.value.message
    assert unknown.value.message == "The API key is not one this proxy knows."
    assert "sk-guess" not in unknown.value.message


def test_a_tenant_is_found_by_any_of_its_keys_digests() -> None:
    sel = selector(ACME, GLOBEX)

    assert sel.authenticate("sk-acme") is ACME
    assert sel.authenticate("sk-acme-old") is ACME  # a key being rotated out still works
    assert sel.authenticate("sk-globex") is GLOBEX
    with pytest.raises(Unauthorized):
        sel.authenticate(hash_key("sk-acme"))  # the digest from the config is not itself a key


def test_the_tenants_policy_beats_the_default() -> None:
    sel = selector(ACME, GLOBEX)

    assert choose(sel, "sk-acme") == ("permissive", "tenant")
    assert choose(sel, "sk-globex") == ("default", "default")  # a tenant without a policy


def test_a_top_level_rule_beats_the_tenants_policy() -> None:
    sel = selector(ACME)

    assert choose(sel, "sk-acme", model="mistral-uncensored-7b") == ("strict", "rule")
    assert choose(sel, "sk-acme", route="/v1/completions") == ("strict", "rule")


def test_the_tenants_own_rule_beats_a_top_level_rule() -> None:
    sel = selector(ACME)

    # acme-7b on /api/chat matches the tenant's rule and the third top-level rule: the tenant's wins.
    assert choose(sel, "sk-acme", model="acme-7b", route="/api/chat") == ("internal", "rule")


def test_rules_match_model_and_route_together_and_the_first_match_wins() -> None:
    sel = selector(GLOBEX)

    assert choose(sel, "sk-globex", model="acme-7b", route="/api/chat") == ("default", "rule")
    assert choose(sel, "sk-globex", model="acme-7b", route="/v1/chat/completions") == ("default", "default")
    # Both the first and the second rule match: the first, in file order, decides.
    assert choose(sel, "sk-globex", model="x-uncensored", route="/v1/completions") == ("strict", "rule")
    assert choose(sel, "sk-globex", model="X-UNCENSORED") == ("default", "default")  # case-sensitive


def test_the_header_beats_everything_when_the_tenant_may_choose_that_policy() -> None:
    sel = selector(ACME)

    assert choose(sel, "sk-acme", requested="strict") == ("strict", "header")
    # Even over a rule: the operator listed the policy as one this tenant may ask for.
    assert choose(sel, "sk-acme", model="acme-1", requested="default") == ("default", "header")


def test_the_header_may_always_name_the_policy_the_request_gets_anyway() -> None:
    sel = selector(ACME)

    assert choose(sel, "sk-acme", requested="permissive") == ("permissive", "tenant")


def test_a_header_the_tenant_may_not_choose_is_refused_not_ignored() -> None:
    sel = selector(ACME, GLOBEX)

    with pytest.raises(Forbidden) as not_allowed:
        choose(sel, "sk-globex", requested="permissive")
    with pytest.raises(Forbidden):  # a rule chose strict; acme may not ask for its own permissive instead
        choose(sel, "sk-acme", model="x-uncensored", requested="permissive")
    with pytest.raises(ClientError) as unknown:
        choose(sel, "sk-acme", requested="lenient")

    assert not_allowed.value.status == 403
    assert not_allowed.value.message == (
        "X-Backtrack-Policy: policy 'permissive' may not be chosen with this key."
    )
    assert (unknown.value.status, unknown.value.message) == (
        400,
        "X-Backtrack-Policy: there is no policy named 'lenient'.",
    )


def test_without_tenants_the_header_may_choose_only_the_anonymous_allowed_policies() -> None:
    sel = selector(anonymous=("strict",))

    assert choose(sel, None, requested="strict") == ("strict", "header")
    with pytest.raises(Forbidden):
        choose(sel, None, requested="permissive")


def test_the_choice_names_the_tenant_but_never_its_key() -> None:
    sel = selector(ACME)

    choice = sel.choose(sel.authenticate("sk-acme"), "m", "/v1/chat/completions")

    assert choice.tenant == "acme"
    assert "sk-acme" not in repr(choice)
    assert "sk-acme" not in repr(sel)


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": "Bearer sk-1"}, "sk-1"),
        ({"Authorization": "bearer  sk-1 "}, "sk-1"),
        ({"x-api-key": "sk-2"}, "sk-2"),  # Anthropic's header
        ({"Authorization": "Basic dTpw", "x-api-key": "sk-3"}, "sk-3"),
        ({"Authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_the_key_is_read_from_bearer_auth_or_x_api_key(headers: dict[str, str], key: str | None) -> None:
    assert presented_key(headers) == key


def test_hash_key_is_the_sha256_hex_digest() -> None:
    # echo -n test | sha256sum
    assert hash_key("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


# -- through the proxy -------------------------------------------------------------------------------


async def test_through_the_proxy_keys_choose_the_policy_and_stay_out_of_the_upstream(
    harness: Harness,
) -> None:
    upstream = await harness.replay()
    (harness.tmp_path / "policies").mkdir()
    (harness.tmp_path / "policies" / "strict.yaml").write_text("holdback_tokens: 40\n", encoding="utf-8")
    tenants = [
        {
            "name": "acme",
            "key_sha256": [hash_key("sk-acme")],
            "policy": "strict",
            "allowed_policies": ["test"],
        },
        {"name": "globex", "key_sha256": [hash_key("sk-globex")]},
    ]
    extra = {"policies": {"strict": "policies/strict.yaml"}, "tenants": tenants}
    root = await harness.proxy(upstream, extra=extra)
    session = await harness.session()

    async def ask(key: str | None, **headers: str) -> tuple[int, str | None, dict[str, Any]]:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        request = {"model": "m", "messages": [{"role": "user", "content": BENIGN["prompt"]}]}
        async with session.post(f"{root}/v1/chat/completions", json=request, headers=headers) as resp:
            return resp.status, resp.headers.get("X-Backtrack-Policy"), await resp.json()

    assert (await ask("sk-acme"))[:2] == (200, "strict")
    assert (await ask("sk-acme", **{"X-Backtrack-Policy": "test"}))[:2] == (200, "test")
    assert (await ask("sk-globex"))[:2] == (200, "test")  # the default policy
    assert (await ask("sk-globex", **{"X-Backtrack-Policy": " "}))[:2] == (200, "test")  # asks for nothing
    assert "sk-globex" not in json.dumps((await replay_stats(upstream))["last_headers"])

    status, _, body = await ask(None)
    assert (status, body["error"]["type"]) == (401, "authentication_error")
    status, _, body = await ask("sk-nobody")
    assert (status, body["error"]["message"]) == (401, "The API key is not one this proxy knows.")
    status, _, body = await ask("sk-globex", **{"X-Backtrack-Policy": "strict"})
    assert (status, body["error"]["type"]) == (403, "permission_error")
    assert body["error"]["message"] == "X-Backtrack-Policy: policy 'strict' may not be chosen with this key."


async def test_the_model_list_needs_a_key_too(harness: Harness) -> None:
    upstream = await harness.replay()
    root = await harness.proxy(upstream, extra={"tenants": [{"name": "a", "key_sha256": [hash_key("sk-a")]}]})
    session = await harness.session()

    async with session.get(f"{root}/v1/models") as resp:
        assert resp.status == 401
    async with session.get(f"{root}/v1/models", headers={"Authorization": "Bearer sk-a"}) as resp:
        assert resp.status == 200


def test_backtrack_hash_key_reads_the_key_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("test\n"))

    assert main(["hash-key"]) == 0
    assert capsys.readouterr().out == hash_key("test") + "\n"


async def test_a_missing_key_is_refused_in_each_routes_error_format(harness: Harness) -> None:
    upstream = await harness.replay()
    root = await harness.proxy(upstream, extra={"tenants": [{"name": "a", "key_sha256": [hash_key("sk-a")]}]})
    session = await harness.session()
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}

    async with session.post(f"{root}/v1/messages", json=chat, headers={"x-api-key": "sk-b"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["type"] == "error"  # Anthropic's envelope
    async with session.post(f"{root}/api/chat", json=chat) as resp:
        assert resp.status == 401
        assert "needs an API key" in (await resp.json())["error"]  # Ollama's: a plain string
    async with session.post(f"{root}/v1/messages", json=chat, headers={"x-api-key": "sk-a"}) as resp:
        assert resp.status == 200
