"""Certificate CNs as principals: the token principals' rules, and a refusal that says why
without repeating the CN."""

from __future__ import annotations

import pytest

from service.security.auth import Authenticator, Unauthenticated, certificate_principal


@pytest.mark.parametrize("cn", ["svc-gateway", "a", "A1.b_c@d+e-f", "x" * 64])
def test_a_cn_within_the_rules_is_the_principal(cn: str) -> None:
    assert certificate_principal(cn) == cn
    assert Authenticator(None, principal_from_cert=True).authenticate(None, cn) == cn


@pytest.mark.parametrize(
    ("cn", "why"),
    [("x" * 65, "65 characters"), ("a" * 300, "300 characters"), ("svc\nadmin", "U+000A at 4"),
     ("svc\r\n", "U+000D at 4"), ("ab\u202ecd", "U+202E at 3"), ("é", "starts with U+00E9"),
     (".svc", "starts with U+002E"), ("svc\x00", "U+0000 at 4"), ("svc/x", "U+002F at 4"),
     ("svc\u200b", "U+200B at 4")],
)  # fmt: skip
def test_a_cn_out_of_the_rules_is_refused_saying_why_without_the_cn(cn: str, why: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        Authenticator(None, principal_from_cert=True).authenticate(None, cn)
    message = str(caught.value)
    assert caught.value.reason == "bad_certificate_name"
    assert why.replace(" at ", " at position ") in message
    assert cn not in message and message.isprintable() and len(message) < 300
