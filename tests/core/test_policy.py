"""Policy files and the selection config: every class of mistake is named by file, key path, value and why.

`test_config.py` covers the config's own sections; here each class of validation error gets its own
test on the policy keys and the tenant/rule keys, and the shipped policies are checked for every key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.core.config import load_settings
from proxy.core.errors import ConfigError
from proxy.core.policy import Action, Policy
from proxy.core.selection import hash_key
from tests.support import REPO

DIGEST = hash_key("sk-acme")


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def setup(tmp_path: Path, policy: object = None, **config: object) -> tuple[Path, Path]:
    """A config naming two policies, `mine` (the default, `policy`) and `calm`; (config, mine's file)."""
    mine = write(tmp_path / "policies" / "mine.yaml", policy if policy is not None else {})
    write(tmp_path / "policies" / "calm.yaml", {})
    data = {
        "policies": {"mine": "policies/mine.yaml", "calm": "policies/calm.yaml"},
        "default_policy": "mine",
    }
    return write(tmp_path / "config.yaml", {**data, **config}), mine


def error_of(config: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    return caught.value.message


# -- the shipped policies ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "strict", "permissive"])
def test_each_shipped_policy_sets_every_key_the_operator_tunes(name: str) -> None:
    text = (REPO / "policies" / f"{name}.yaml").read_text(encoding="utf-8")
    keys = set(yaml.safe_load(text))

    tuned = {
        "detectors", "logit_bias", "threshold", "holdback_tokens", "score_every_tokens", "actions",
        "refusal_message", "messages", "max_resets", "fail_mode", "score_prompt", "score_prefill", "audit",
    }  # fmt: skip
    assert tuned <= keys
    assert keys <= set(Policy.model_fields)
    assert text.startswith("# ")  # each file says what it is for


def test_the_shipped_policies_differ_where_they_say_they_do() -> None:
    settings = load_settings(REPO / "config.yaml", env={})
    default, strict, permissive = (settings.policy(n) for n in ("default", "strict", "permissive"))

    assert strict.holdback_tokens > default.holdback_tokens > permissive.holdback_tokens
    assert strict.logit_bias > default.logit_bias > permissive.logit_bias
    assert (strict.fail_mode, default.fail_mode) == ("closed", "open")
    assert strict.action_for("credentials") is Action.TRUNCATE
    assert strict.audit == "kept"
    assert permissive.score_prefill is False


def test_a_category_message_replaces_the_refusal_for_that_category_only() -> None:
    policy = Policy(name="p", refusal_message="No.", messages={"self_harm": "Please reach out for help."})

    assert policy.message_for("self_harm") == "Please reach out for help."
    assert policy.message_for("weapons") == "No."


# -- one test per class of mistake -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"treshold": 0.5}, "'treshold' has value 0.5. Extra inputs are not permitted"),
        (
            {"detectors": {"model": {"enabeld": True}}},
            "'detectors.model.enabeld' has value True. Extra inputs are not permitted",
        ),
        ({"detectors": {"guard": {}}}, "'detectors.guard' Extra inputs are not permitted"),
    ],
)
def test_an_unknown_key_is_named_with_its_path(tmp_path: Path, policy: object, expected: str) -> None:
    config, mine = setup(tmp_path, policy)

    assert error_of(config) == f"{mine}: {expected}"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"logit_bias": "low"}, "'logit_bias' has value 'low'. Input should be a valid number"),
        ({"max_resets": 1.5}, "'max_resets' has value 1.5. Input should be a valid integer"),
        ({"score_prompt": "perhaps"}, "'score_prompt' has value 'perhaps'. Input should be a valid boolean"),
        ({"messages": ["no"]}, "'messages' has value ['no']. Input should be a valid dictionary"),
        ({"messages": {"unsafe": 3}}, "'messages.unsafe' has value 3. Input should be a valid string"),
        ({"detectors": {"patterns": {"words": []}}}, "'detectors.patterns' Input should be a valid list"),
    ],
)
def test_a_wrong_type_is_named_with_its_value(tmp_path: Path, policy: object, expected: str) -> None:
    config, mine = setup(tmp_path, policy)

    assert error_of(config).startswith(f"{mine}: {expected}")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"logit_bias": -25}, "'logit_bias' has value -25. Input should be greater than or equal to -20"),
        ({"threshold": 0}, "'threshold' has value 0. Input should be greater than 0"),
        ({"holdback_tokens": 5000}, "'holdback_tokens' has value 5000. Input should be less than or equal"),
        (
            {"score_every_tokens": 0},
            "'score_every_tokens' has value 0. Input should be greater than or equal",
        ),
        ({"max_resets": 11}, "'max_resets' has value 11. Input should be less than or equal to 10"),
        ({"guard_timeout_seconds": 0}, "'guard_timeout_seconds' has value 0. Input should be greater than 0"),
    ],
)
def test_an_out_of_range_value_says_the_bound(tmp_path: Path, policy: object, expected: str) -> None:
    config, mine = setup(tmp_path, policy)

    assert error_of(config).startswith(f"{mine}: {expected}")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            {"actions": {"default": "block"}},
            "'actions.default' has value 'block'. Input should be 'refuse', ",
        ),
        ({"audit": "full"}, "'audit' has value 'full'. Input should be 'redacted' or 'kept'"),
        ({"fail_mode": "half"}, "'fail_mode' has value 'half'. Input should be 'open' or 'closed'"),
    ],
)
def test_a_value_outside_its_choices_lists_them(tmp_path: Path, policy: object, expected: str) -> None:
    config, mine = setup(tmp_path, policy)

    assert error_of(config).startswith(f"{mine}: {expected}")


def test_several_mistakes_in_one_policy_are_reported_together(tmp_path: Path) -> None:
    config, mine = setup(tmp_path, {"threshold": 2, "holdback_tokens": -1, "colour": "red"})

    lines = error_of(config).splitlines()

    assert [line.split("'")[1] for line in lines] == ["threshold", "holdback_tokens", "colour"]
    assert all(line.startswith(f"{mine}: ") for line in lines)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"tenants": [{"name": "acme", "key_sha256": [DIGEST], "policy": "stern"}]},
            "'tenants.0.policy' has value 'stern'",
        ),
        (
            {"tenants": [{"name": "acme", "key_sha256": [DIGEST], "allowed_policies": ["calm", "lax"]}]},
            "'tenants.0.allowed_policies.1' has value 'lax'",
        ),
        ({"rules": [{"model": "gpt-*", "policy": "stern"}]}, "'rules.0.policy' has value 'stern'"),
        (
            {
                "tenants": [
                    {"name": "a", "key_sha256": [DIGEST], "rules": [{"route": "/v1/*", "policy": "x"}]}
                ]
            },
            "'tenants.0.rules.0.policy' has value 'x'",
        ),
        ({"anonymous_allowed_policies": ["lax"]}, "'anonymous_allowed_policies.0' has value 'lax'"),
    ],
)
def test_a_selection_naming_an_unknown_policy_lists_the_known_ones(
    tmp_path: Path, config: dict[str, object], expected: str
) -> None:
    path, _ = setup(tmp_path, **config)

    assert error_of(path) == f"{path}: {expected}. Not one of the policies: calm, mine"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"rules": [{"policy": "calm"}]}, "'rules.0' Value error, a rule needs 'model' or 'route'"),
        (
            {"tenants": [{"name": "a c", "key_sha256": [DIGEST]}]},
            "'tenants.0.name' has value 'a c'. String should",
        ),
        (
            {"tenants": [{"name": "acme", "key_sha256": []}]},
            "'tenants.0.key_sha256' has a value that is not shown",
        ),
        ({"tenants": [{"name": "acme"}]}, "'tenants.0.key_sha256' Field required"),
    ],
)
def test_a_malformed_tenant_or_rule_is_named(
    tmp_path: Path, config: dict[str, object], expected: str
) -> None:
    path, _ = setup(tmp_path, **config)

    assert error_of(path).startswith(f"{path}: {expected}")


def test_a_plain_key_where_its_digest_belongs_is_refused_without_being_repeated(tmp_path: Path) -> None:
    path, _ = setup(tmp_path, tenants=[{"name": "acme", "key_sha256": ["sk-live-secret-123"]}])

    message = error_of(path)

    assert message.startswith(f"{path}: 'tenants.0.key_sha256.0' has a value that is not shown (a secret).")
    assert "sha256 hex digest of the key" in message
    assert "sk-live-secret-123" not in message


def test_two_tenants_with_one_name_or_one_key_are_refused(tmp_path: Path) -> None:
    other = hash_key("sk-other")
    tenants = [
        {"name": "acme", "key_sha256": [DIGEST]},
        {"name": "acme", "key_sha256": [other]},
        {"name": "globex", "key_sha256": [other]},
    ]
    path, _ = setup(tmp_path, tenants=tenants)

    assert error_of(path).splitlines() == [
        f"{path}: 'tenants.1.name' has value 'acme'. Another tenant has it",
        f"{path}: 'tenants.2.key_sha256.0' The same key is already tenant 'acme''s",
    ]


def test_a_policy_file_that_is_not_yaml_or_not_a_mapping_is_named(tmp_path: Path) -> None:
    config, mine = setup(tmp_path, "holdback_tokens: [8\n")
    assert error_of(config).startswith(f"{mine}: not valid YAML")

    write(mine, "- refuse\n")
    assert error_of(config) == f"{mine}: a policy must be a mapping of keys to values"
