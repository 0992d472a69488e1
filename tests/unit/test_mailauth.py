"""The pure parts of inbound verification: SPF macros and records, DMARC records and
alignment, the Authentication-Results field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.mailauth import authres, dmarc, spf

IP4 = "192.0.2.3"
SENDER = "strong-bad@email.example.com"


# RFC 7208 §7.4's examples, with sender strong-bad@email.example.com and 192.0.2.3
@pytest.mark.parametrize(("macro", "expanded"), [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%%%_%-", "% %20"),
])
def test_spf_macros_expand_as_rfc_7208_shows(macro: str, expanded: str) -> None:
    assert spf.expand_macros(macro, IP4, SENDER, "email.example.com", "mx.example.org") \
        == expanded


def test_spf_ipv6_i_macro_is_dotted_nibbles() -> None:
    got = spf.expand_macros("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01", SENDER,
                            "email.example.com", "h")
    assert got == ("1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
                   ".ip6._spf.example.com")


def test_spf_upper_case_macro_url_escapes() -> None:
    assert spf.expand_macros("%{S}", IP4, "a b@x.example", "x.example", "h") == "a%20b%40x.example"


@pytest.mark.parametrize(("record", "error"), [
    ("v=spf1 ip4:300.1.1.1 -all", "is not an address"),
    ("v=spf1 foo:bar -all", "unknown mechanism"),
    ("v=spf1 redirect=a.example redirect=b.example", "appears twice"),
    ("v=spf1 include -all", "needs a domain"),
    ("v=spf1 ip6:192.0.2.1", "wrong address family"),
    ("v=spf1 a:%{x}.example", "bad macro"),
    ("v=spf1 ip4:192.0.2.0/33", "bad prefix length"),
    ("v=spf1 all:x", "takes no argument"),
    ("v=spf10 -all", "does not start with v=spf1"),
])
def test_broken_spf_records_raise_spf_error(record: str, error: str) -> None:
    with pytest.raises(spf.SpfError, match=error):
        spf.parse_record(record)


def test_spf_record_terms_parse_with_cidr_lengths() -> None:
    terms = spf.parse_record("v=spf1 a/24//64 mx:mx.example.org/28 -ip4:10.0.0.0/8 ~all "
                             "unknown=x exp=explain.%{d}")
    assert terms[0] == spf.Term("a", "", "+", 24, 64)
    assert terms[1] == spf.Term("mx", "mx.example.org", "+", 28, None)
    assert terms[2] == spf.Term("ip4", "10.0.0.0", "-", 8, None)
    assert terms[3] == spf.Term("all", "", "~")
    assert [t.name for t in terms[4:]] == ["unknown", "exp"]


@given(st.text(max_size=300))
def test_spf_parser_raises_only_spf_error(text: str) -> None:
    try:
        spf.parse_record("v=spf1 " + text)
    except spf.SpfError:
        pass


@pytest.mark.parametrize(("record", "expected"), [
    ("v=DMARC1; p=reject", dmarc.DmarcRecord("reject", "reject")),
    ("v=DMARC1;p=quarantine;sp=none;pct=20;adkim=s", dmarc.DmarcRecord(
        "quarantine", "none", 20, "s", "r")),
    ("v=DMARC1; rua=mailto:x@example.org", dmarc.DmarcRecord("none", "none")),
    ("v=DMARC1; p=REJECT; future=1", dmarc.DmarcRecord("reject", "reject")),
])
def test_dmarc_records_parse(record: str, expected: dmarc.DmarcRecord) -> None:
    assert dmarc.parse_record(record) == expected


@pytest.mark.parametrize("record", [
    "p=reject; v=DMARC1", "v=DMARC2; p=reject", "v=DMARC1; p=maybe", "v=DMARC1; p=none; pct=101",
    "v=DMARC1; p=none; adkim=x", "v=DMARC1; garbage",
])
def test_broken_dmarc_records_raise_dmarc_error(record: str) -> None:
    with pytest.raises(dmarc.DmarcError):
        dmarc.parse_record(record)


@given(st.text(max_size=300))
def test_dmarc_parser_raises_only_dmarc_error(text: str) -> None:
    try:
        dmarc.parse_record("v=DMARC1;" + text)
    except dmarc.DmarcError:
        pass


@pytest.mark.parametrize(("ident", "from_", "mode", "expected"), [
    ("mail.example.co.uk", "example.co.uk", "r", True),
    ("mail.example.co.uk", "example.co.uk", "s", False),
    ("example.co.uk", "other.co.uk", "r", False),
    ("bounces.far.test", "far.test", "r", True),
    ("EXAMPLE.ORG.", "example.org", "s", True),
])
def test_alignment_uses_the_organisational_domain(ident: str, from_: str, mode: str,
                                                  expected: bool) -> None:
    assert dmarc.aligned(ident, from_, mode) is expected


@pytest.mark.parametrize(("value", "authserv"), [
    (b"mx.example.org; spf=pass", "mx.example.org"),
    (b"MX.Example.Org 1; none", "mx.example.org"),
    (b"(comment) mx.example.org (c2); dkim=pass", "mx.example.org"),
    (b'"mx.example.org"; none', "mx.example.org"),
    (b"", ""),
])
def test_authserv_id_is_read_from_a_field(value: bytes, authserv: str) -> None:
    assert authres.authserv_id(value) == authserv


def test_forged_fields_are_renamed_in_place_keeping_the_length() -> None:
    head = bytearray(b"Received: x\r\nAuthentication-Results: MX.example.org; dkim=pass\r\n"
                     b"authentication-results: other.example; spf=pass\r\n\r\nbody "
                     b"Authentication-Results: mx.example.org\r\n")
    size = len(head)
    assert authres.neutralise_forged(head, "mx.example.org") == 1
    assert len(head) == size
    assert b"X-Forged-Authn-Results: MX.example.org; dkim=pass" in head
    assert b"authentication-results: other.example" in head
    assert head.endswith(b"body Authentication-Results: mx.example.org\r\n")   # body untouched


def test_the_field_is_rendered_with_quoted_values_where_needed() -> None:
    field = authres.render("mx.example.org", [
        authres.Method("spf", "pass", props=(("smtp.mailfrom", "a@b.example"),),
                       comment="b.example: matched (x)"),
        authres.Method("dkim", "fail", reason="bad; sig", props=(("header.d", "b.example"),)),
    ])
    assert field == (b"Authentication-Results: mx.example.org;\r\n"
                     b"\tspf=pass (b.example: matched  x ) smtp.mailfrom=a@b.example;\r\n"
                     b'\tdkim=fail reason="bad; sig" header.d=b.example\r\n')


@given(st.binary(max_size=2000))
def test_header_reading_never_raises(data: bytes) -> None:
    fields = authres.header_fields(data)
    authres.from_domains(fields)
    for _, value, _ in fields:
        authres.authserv_id(value)
    authres.neutralise_forged(bytearray(data), "mx.example.org")
