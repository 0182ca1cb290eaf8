"""Which policy a request gets: tenants (proxy API keys), rules, and the `X-Backtrack-Policy` header.

Sans-IO: a `Selector` is built from a `PolicySet` (the part of the config a reload replaces) and answers
from plain values (a presented key, a model name, a route, a requested policy). The server reads them
off the request and turns the errors raised here into its API error format.

Keys are configured only as sha256 hex digests (`backtrack hash-key` prints one); a presented key is
hashed and looked up, so the plain key is never stored, logged or exported.

Precedence, first that applies wins:

    1. the `X-Backtrack-Policy` header, if the tenant may choose that policy (its `allowed_policies`;
       with no tenants configured, `anonymous_allowed_policies`) or it is the policy 2-4 pick anyway;
       any other named policy is refused (400 unknown, 403 not allowed), never silently replaced
    2. the first rule that matches the request's model (glob) and route (glob): the tenant's own
       `rules` first, then the top-level `rules`, each in file order
    3. the tenant's `policy`
    4. `default_policy`

When tenants are configured every request must present a known key (`Authorization: Bearer KEY` or
`x-api-key: KEY`): a missing or unknown one is refused with 401.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from proxy.core.errors import ClientError, Forbidden, Unauthorized
from proxy.core.policy import Policy, _Frozen

POLICY_HEADER = "X-Backtrack-Policy"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a proxy API key is configured."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Rule(_Frozen):
    """Requests whose model and route match these globs get `policy` (an omitted glob matches all)."""

    policy: str = Field(min_length=1)
    model: str | None = Field(None, min_length=1)  # e.g. "llama-3*"; matched case-sensitively
    route: str | None = Field(None, min_length=1)  # e.g. "/v1/completions" or "/api/*"

    @model_validator(mode="after")
    def _narrows(self) -> Rule:
        if self.model is None and self.route is None:
            raise ValueError("a rule needs 'model' or 'route' (or both); use 'policy' or 'default_policy'")
        return self

    def matches(self, model: str, route: str) -> bool:
        return (self.model is None or fnmatchcase(model, self.model)) and (
            self.route is None or fnmatchcase(route, self.route)
        )


def _digest(value: str) -> str:
    if not _SHA256_HEX.fullmatch(value):
        # The value is not repeated (see `SECRET_KEYS`): an operator may have pasted the key itself.
        raise ValueError(
            "must be the sha256 hex digest of the key (64 lowercase hex digits, as "
            "`backtrack hash-key` prints it), never the key itself"
        )
    return value


class Tenant(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # Several digests let a key be rotated: add the new one, hand it out, then remove the old one.
    key_sha256: list[Annotated[str, AfterValidator(_digest)]] = Field(min_length=1)
    policy: str | None = None  # None: `default_policy`
    allowed_policies: list[str] = Field(default_factory=list)  # what the header may choose
    rules: list[Rule] = Field(default_factory=list)


@dataclass(frozen=True)
class PolicySet:
    """What a reload replaces as one: the policies and the rules for who gets which."""

    policies: Mapping[str, Policy]
    default_policy: str
    tenants: tuple[Tenant, ...] = ()
    rules: tuple[Rule, ...] = ()
    anonymous_allowed_policies: tuple[str, ...] = ()

    def reference_errors(self, source: str) -> list[str]:
        """Every policy name the selection refers to that is not a policy, and every repeated key."""
        known = ", ".join(sorted(self.policies))
        refs: list[tuple[str, str]] = [("default_policy", self.default_policy)]
        refs += [
            (f"anonymous_allowed_policies.{n}", p) for n, p in enumerate(self.anonymous_allowed_policies)
        ]
        refs += [(f"rules.{n}.policy", r.policy) for n, r in enumerate(self.rules)]
        refs += [
            (f"policies.{name}.strikes.escalate_to", p.strikes.escalate_to)
            for name, p in self.policies.items()
            if p.strikes is not None and p.strikes.escalate_to is not None
        ]
        seen_names: set[str] = set()
        seen_keys: dict[str, str] = {}
        errors: list[str] = []
        for t, tenant in enumerate(self.tenants):
            where = f"tenants.{t}"
            if tenant.policy is not None:
                refs.append((f"{where}.policy", tenant.policy))
            refs += [(f"{where}.allowed_policies.{n}", p) for n, p in enumerate(tenant.allowed_policies)]
            refs += [(f"{where}.rules.{n}.policy", r.policy) for n, r in enumerate(tenant.rules)]
            if tenant.name in seen_names:
                errors.append(f"{source}: '{where}.name' has value {tenant.name!r}. Another tenant has it")
            seen_names.add(tenant.name)
            for k, digest in enumerate(tenant.key_sha256):
                if digest in seen_keys:
                    errors.append(
                        f"{source}: '{where}.key_sha256.{k}' The same key is already tenant "
                        f"{seen_keys[digest]!r}'s"
                    )
                seen_keys.setdefault(digest, tenant.name)
        errors += [
            f"{source}: 'policies.{name}.strikes.escalate_to' has value {name!r}. A policy cannot "
            "escalate to itself"
            for name, p in self.policies.items()
            if p.strikes is not None and p.strikes.escalate_to == name
        ]
        errors += [
            f"{source}: '{path}' has value {name!r}. Not one of the policies: {known}"
            for path, name in refs
            if name not in self.policies
        ]
        return errors


@dataclass(frozen=True)
class Selection:
    policy: Policy
    tenant: str | None  # the tenant's name; None for an anonymous request
    reason: str  # "header", "rule", "tenant" or "default": which step of the precedence chose


@dataclass(frozen=True)
class Selector:
    policy_set: PolicySet
    _by_digest: dict[str, Tenant] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_digest = {d: t for t in self.policy_set.tenants for d in t.key_sha256}
        object.__setattr__(self, "_by_digest", by_digest)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant whose key this is; None when no tenants are configured. Raises `Unauthorized`."""
        if not self.policy_set.tenants:
            return None
        if not key:
            raise Unauthorized("This proxy needs an API key: send it as 'Authorization: Bearer KEY'.")
        # A dict lookup by digest leaks nothing useful through timing: one cannot steer a sha256 digest.
        tenant = self._by_digest.get(hash_key(key))
        if tenant is None:
            raise Unauthorized("The API key is not one this proxy knows.")
        return tenant

    def choose(
        self, tenant: Tenant | None, model: str, route: str, requested: str | None = None
    ) -> Selection:
        """The policy for one request (see the module docstring for the precedence)."""
        ps = self.policy_set
        name, reason = self._configured(tenant, model, route)
        if requested is not None and requested != name:
            if requested not in ps.policies:
                raise ClientError(f"{POLICY_HEADER}: there is no policy named {requested!r}.")
            allowed = tenant.allowed_policies if tenant is not None else ps.anonymous_allowed_policies
            if requested not in allowed:
                raise Forbidden(f"{POLICY_HEADER}: policy {requested!r} may not be chosen with this key.")
            name, reason = requested, "header"
        return Selection(ps.policies[name], tenant.name if tenant is not None else None, reason)

    def _configured(self, tenant: Tenant | None, model: str, route: str) -> tuple[str, str]:
        rules = (*(tenant.rules if tenant is not None else ()), *self.policy_set.rules)
        for rule in rules:
            if rule.matches(model, route):
                return rule.policy, "rule"
        if tenant is not None and tenant.policy is not None:
            return tenant.policy, "tenant"
        return self.policy_set.default_policy, "default"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The proxy API key a client sent: OpenAI's and Ollama's bearer token, or Anthropic's x-api-key."""
    auth = headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


def forwarded_headers(headers: Mapping[str, str], tenant: Tenant | None) -> dict[str, str]:
    """The client's headers to pass upstream: a tenant's key is the proxy's own and stays here."""
    if tenant is None:
        return dict(headers)
    return {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-api-key")}


# -- `backtrack hash-key` ----------------------------------------------------------------------------
