"""Envelope path parsing (RFC 5321 §4.1.2) and the addresses that would route themselves."""

from __future__ import annotations

import pytest

from postroom.address import AddressError, parse_path, routing_hazard
from postroom.model import Address

LONG_LABEL = "l" * 63
GREEK_LOCAL = "\u03b4\u03bf\u03ba\u03b9\u03bc\u03ae"                       # δοκιμή
GREEK_DOMAIN = "\u03c0\u03b1\u03c1\u03ac\u03b4\u03b5\u03b9\u03b3\u03bc\u03b1.example"  # παράδειγμα
DOMAIN_250 = ".".join([LONG_LABEL] * 3) + "." + "d" * 58          # 63*3 + 3 + 58 = 250

VALID = [
    # id, text, allow_null, utf8, expected local, expected domain
    ("plain", "<alice@example.test>", False, False, "alice", "example.test"),
    ("domain_is_lower_cased_local_keeps_case", "<Alice.Smith@EXAMPLE.Test>", False, False,
     "Alice.Smith", "example.test"),
    ("null_path_where_allowed", "<>", True, False, "", ""),
    ("plus_tag_and_subdomain", "<a.b+tag@mail.sub.example.test>", False, False,
     "a.b+tag", "mail.sub.example.test"),
    ("all_atext_specials", "<!#$%&'*+-/=?^_`{|}~@example.test>", False, False,
     "!#$%&'*+-/=?^_`{|}~", "example.test"),
    ("quoted_local_with_space", '<"john smith"@example.test>', False, False,
     '"john smith"', "example.test"),
    ("quoted_local_with_escaped_quote", r'<"a\"b"@example.test>', False, False,
     r'"a\"b"', "example.test"),
    ("quoted_local_with_at", '<"bob@remote.example"@example.test>', False, False,
     '"bob@remote.example"', "example.test"),
    ("ipv4_address_literal", "<user@[192.0.2.1]>", False, False, "user", "[192.0.2.1]"),
    ("ipv6_address_literal", "<user@[IPv6:2001:DB8::1]>", False, False,
     "user", "[ipv6:2001:db8::1]"),
    ("trailing_dot_kept_for_the_hazard_check", "<bob@remote.example.>", False, False,
     "bob", "remote.example."),
    ("percent_hack_parses", "<bob%remote.example@example.test>", False, False,
     "bob%remote.example", "example.test"),
    ("bang_path_parses", "<remote.example!bob@example.test>", False, False,
     "remote.example!bob", "example.test"),
    ("hyphen_inside_label", "<a@mail-1.example-test.test>", False, False,
     "a", "mail-1.example-test.test"),
    ("numeric_labels", "<a@123.example>", False, False, "a", "123.example"),
    ("local_part_of_64_octets", f"<{'x' * 64}@example.test>", False, False,
     "x" * 64, "example.test"),
    ("label_of_63_octets", f"<a@{LONG_LABEL}.test>", False, False, "a", f"{LONG_LABEL}.test"),
    ("path_of_256_octets", f"<{'x' * 5}@{DOMAIN_250}>", False, False, "x" * 5, DOMAIN_250),
    # domains are normalised to their IDNA A-label, the one spelling compared everywhere
    ("utf8_local_and_domain", f"<{GREEK_LOCAL}@{GREEK_DOMAIN}>", False, True,
     GREEK_LOCAL, "xn--hxajbheg2az3al.example"),
    ("utf8_flag_still_accepts_ascii", "<alice@example.test>", False, True, "alice", "example.test"),
    ("utf8_domain_is_lower_cased", "<j\u00f6rg@B\u00dcCHER.example>", False, True,
     "j\u00f6rg", "xn--bcher-kva.example"),
    ("a_labels_and_u_labels_are_one_domain", "<a@xn--bcher-kva.example>", False, True,
     "a", "xn--bcher-kva.example"),
    ("ideographic_full_stop_and_full_width_letters", "<a@\uff45xample\u3002test>", False,
     True, "a", "example.test"),
]


@pytest.mark.parametrize(("text", "allow_null", "utf8", "local", "domain"),
                         [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_parse_path_accepts_valid_paths(text: str, allow_null: bool, utf8: bool,
                                        local: str, domain: str) -> None:
    assert parse_path(text, allow_null=allow_null, utf8=utf8) == Address(local, domain)


INVALID = [
    # id, text, allow_null, utf8, substring of the reason
    ("no_angle_brackets", "alice@example.test", False, False, "enclosed in <>"),
    ("only_opening_bracket", "<alice@example.test", False, False, "enclosed in <>"),
    ("empty_text", "", True, False, "enclosed in <>"),
    ("null_path_where_not_allowed", "<>", False, False, "null path not allowed"),
    ("source_route", "<@relay.example:bob@remote.example>", False, False, "source routes"),
    ("multi_hop_source_route", "<@a.example,@b.example:bob@remote.example>", False, False,
     "source routes"),
    ("no_at_sign", "<alice>", False, False, "exactly one @"),
    ("two_at_signs", "<bob@remote.example@example.test>", False, False, "exactly one @"),
    ("empty_local", "<@example.test>", False, False, "source routes"),
    ("empty_domain", "<alice@>", False, False, "empty domain"),
    ("domain_only_a_dot", "<alice@.>", False, False, "empty domain"),
    ("consecutive_dots_in_local", "<a..b@example.test>", False, False, "invalid local part"),
    ("leading_dot_in_local", "<.a@example.test>", False, False, "invalid local part"),
    ("trailing_dot_in_local", "<a.@example.test>", False, False, "invalid local part"),
    ("space_in_local", "<a b@example.test>", False, False, "invalid local part"),
    ("parenthesis_in_local", "<a(b)@example.test>", False, False, "invalid local part"),
    ("local_part_of_65_octets", f"<{'x' * 65}@example.test>", False, False,
     "local part longer than 64"),
    ("path_of_257_octets", f"<{'x' * 6}@{DOMAIN_250}>", False, False, "longer than 256"),
    ("label_starting_with_hyphen", "<a@-bad.example>", False, False, "invalid domain label"),
    ("label_ending_with_hyphen", "<a@bad-.example>", False, False, "invalid domain label"),
    ("underscore_in_label", "<a@bad_label.example>", False, False, "invalid domain label"),
    ("empty_label", "<a@example..test>", False, False, "invalid domain label"),
    ("label_of_64_octets", f"<a@{'l' * 64}.test>", False, False, "invalid domain label"),
    ("space_in_domain", "<a@exa mple.test>", False, False, "invalid domain label"),
    ("non_ascii_without_utf8", "<j\u00f6rg@example.test>", False, False, "non-ASCII"),
    ("non_ascii_domain_without_utf8", "<a@b\u00fccher.example>", False, False, "non-ASCII"),
    ("unterminated_quoted_local", '<"alice@example.test>', False, False, "missing @domain"),
    ("text_after_quoted_local", '<"a"b@example.test>', False, False, "missing @domain"),
    ("utf8_bad_local", "<a..\u00f6@example.test>", False, True, "invalid local part"),
    ("utf8_bad_domain_label", "<\u00f6@-x.example>", False, True, "invalid domain label"),
]


@pytest.mark.parametrize(("text", "allow_null", "utf8", "reason"),
                         [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_parse_path_refuses_invalid_paths_with_a_reason(text: str, allow_null: bool,
                                                        utf8: bool, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(text, allow_null=allow_null, utf8=utf8)
    assert reason in str(info.value)


def test_address_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_path("nonsense", allow_null=False)


HAZARDS = [
    # id, path, substring of the hazard or None
    ("ordinary_address", "<alice@example.test>", None),
    ("null_path", "<>", None),
    ("quoted_local_without_at", '<"john smith"@example.test>', None),
    ("dots_and_plus", "<a.b+c@example.test>", None),
    ("percent_hack", "<bob%remote.example@example.test>", "percent hack"),
    ("bang_path", "<remote.example!bob@example.test>", "bang path"),
    ("quoted_at", '<"bob@remote.example"@example.test>', "quoted local part contains '@'"),
    ("quoted_percent", '<"bob%remote.example"@example.test>', "percent hack"),
    ("ipv4_literal", "<bob@[127.0.0.1]>", "address literal"),
    ("ipv6_literal", "<bob@[IPv6:::1]>", "address literal"),
    ("trailing_dot_remote", "<bob@remote.example.>", "ends with a dot"),
    ("trailing_dot_local", "<alice@example.test.>", "ends with a dot"),
]


@pytest.mark.parametrize(("path", "hazard"), [c[1:] for c in HAZARDS], ids=[c[0] for c in HAZARDS])
def test_routing_hazard_names_every_self_routing_feature(path: str, hazard: str | None) -> None:
    found = routing_hazard(parse_path(path, allow_null=True))
    if hazard is None:
        assert found is None
    else:
        assert found is not None and hazard in found
