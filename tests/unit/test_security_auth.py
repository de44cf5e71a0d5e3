"""The token file, the Authorization header and the security flags, one rule at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ServerConfig
from service.errors import ConfigError
from service.security import auth
from service.security.auth import Authenticator, TokenFile, bearer_token, parse_tokens

SECRET = "s3cr3t-token-value-0123"


def test_token_lines_comments_and_blank_lines() -> None:
    entries = parse_tokens(f"# callers\n\n  alice : {SECRET}\nbob:other\nalice:second\n", "f")
    assert [name for _digest, name in entries] == ["alice", "bob", "alice"]
    assert all(len(digest) == 32 for digest, _name in entries)  # SHA-256 digests, no tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [("alice\n", "line 1: expected 'principal:token'"), ("alice:\n", "expected"),
     ("al ice:x\n", "principal 'al ice'"), (f"alice:{SECRET} more\n", "spaces"),
     (f"alice:{SECRET}\nbob:{SECRET}\n", "line 2: 'bob' has the same token as 'alice'")],
)  # fmt: skip
def test_a_bad_line_is_refused_naming_the_line_never_the_token(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        parse_tokens(text, "f")
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("header", ["Bearer", "Basic abc", "Bearer a b", "abc", "Bearer  "])
def test_a_malformed_authorization_header_is_refused_without_echo(header: str) -> None:
    with pytest.raises(auth.Unauthenticated) as err:
        bearer_token(header)
    assert err.value.reason == "malformed" and "abc" not in str(err.value)


def test_the_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token("bearer tok") == bearer_token("BEARER tok") == "tok"


def test_lookup_finds_the_principal_and_refuses_others(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"alice:{SECRET}\n")
    check = Authenticator(TokenFile(path))
    assert check.authenticate(f"Bearer {SECRET}", None) == "alice"
    for header, reason in ((None, "missing"), ("Bearer nope", "unknown")):
        with pytest.raises(auth.Unauthenticated) as err:
            check.authenticate(header, "cn-ignored")
        assert err.value.reason == reason


def test_principal_from_cert_when_no_token_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"alice:{SECRET}\n")
    both = Authenticator(TokenFile(path), principal_from_cert=True)
    assert both.authenticate(None, "svc-a") == "svc-a"
    assert both.authenticate(f"Bearer {SECRET}", "svc-a") == "alice"  # a token wins
    with pytest.raises(auth.Unauthenticated):
        both.authenticate("Bearer nope", "svc-a")  # a wrong token is never rescued by the cert
    with pytest.raises(auth.Unauthenticated) as err:
        Authenticator(None, principal_from_cert=True).authenticate(None, None)
    assert err.value.reason == "no_certificate"


def test_certificate_principals_are_capped_as_metric_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth, "_CERT_LABELS", set())  # the process's own labels stay untouched
    check = Authenticator(None, principal_from_cert=True)
    labels = {check.label(f"svc-{i}") for i in range(auth.MAX_CERT_LABELS + 10)}
    assert auth.OTHER in labels and len(labels) <= auth.MAX_CERT_LABELS + 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"tls_cert": "c.pem"}, "go together"), ({"tls_key": "k.pem"}, "go together"),
     ({"tls_client_ca": "ca.pem"}, "needs --tls-cert"),
     ({"principal_from_cert": True}, "needs --tls-client-ca"),
     ({"health_port": 70000}, "health_port")],
)  # fmt: skip
def test_security_settings_are_checked_together(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**fields)  # type: ignore[arg-type]
