"""Phone numbers in the PII stage: international and national layouts of many countries are replaced
and counted; version numbers, dates, section numbers, hashes, prices, ISBNs, integers and timestamps
survive."""

import pytest

from hybrid_mamba.data_scripts.pii import scrub
from hybrid_mamba.data_scripts.recipe import PIIConfig, RecipeError, parse_recipe

PHONE_ONLY = PIIConfig(kinds=["phone"])

INTERNATIONAL = [
    "+44 7700 900461",  # UK mobile (Ofcom's drama range: possible, not valid)
    "+447700900461",  # E.164 without separators
    "+44 20 7946 0958",  # London
    "+44 (0)20 7946 0958",
    "(+44) 20 7946 0958",
    "+49 30 25738190",  # Berlin: a group of eight
    "+49(30)25738190",
    "+33 1 42 68 53 00",  # Paris
    "+33.1.42.68.53.00",
    "+81 3-1234-5678",  # Tokyo
    "+91 98765 43210",  # India, mobile
    "+55 11 91234-5678",  # Sao Paulo, mobile
    "+61 2 9374 4000",  # Sydney
    "+7 (495) 123-45-67",  # Moscow
    "+86 10 1234 5678",  # Beijing
    "+34 912 345 678",  # Madrid
    "+1 415 555 0100",
    "+1-800-555-0199",
    "+1 (415) 555-0100",
]

NORTH_AMERICAN = ["(415) 555-0100", "(415)555-0100", "415-555-0100", "415.555.0100", "415 555 0100", "1-800-555-0199"]

NATIONAL = [
    ("GB", "020 7946 0958"),
    ("DE", "030 25738190"),
    ("DE", "(030) 25738190"),
    ("DE", "030/25738190"),
    ("FR", "01 42 68 53 00"),
    ("FR", "01.42.68.53.00"),
    ("JP", "03-1234-5678"),
    ("IN", "98765 43210"),
    ("BR", "(11) 91234-5678"),
    ("AU", "(02) 9374 4000"),
    ("AU", "0412 345 678"),
]

LOOK_ALIKES = [
    "1.2.3",
    "v2.10.14",
    "3.11.7",
    "1.22.333.4444.5",
    "2024-11-30",
    "2024-11-30 12:30:45",
    "30.11.2024",
    "05.06.2024",
    "11/30/2024",
    "§ 12.3.4",
    "4.2.1.3",
    "$1,299.99",
    "12 345,67 EUR",
    "12 345 678,90 EUR",
    "192.168.1.10",
    "10.100.200.30",
    "ISBN 978-3-16-148410-0",
    "ISBN 978 0 306 40615 7",
    "e3b0c442 98fc1c14 9afbf4c8 996fb924",
    "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "commit 3f1c2a9",
    "1234567",
    "1234567890",
    "digits = '0123456789'",
    "1732963200",
    "1732963200000",
    "2.71828183 3.14159265 1.41421356",
    "22026.4658",
    "+3.14159265",
    "+2024-11-30",
    "+1 2 3 4 5 6 7 8 9",
    "+1.2.3.4.5.6.7.8",
    "+1 555 0100",  # no area code
    "+10 20 30 40 50",
    "+100 200 300",
    "x +1234567890",
    "x = [10 20 30 40 50]",
    "1 234 567 890",
    "1234 5678 9012 3456",
    "123-456-7890",  # North American shape, but no area code 123
    "555-0100",
    "ZIP 94103-1234",
    "pages 123-456 and 789-1011",
    "1999-2024",
]


@pytest.mark.parametrize("number", INTERNATIONAL)
def test_international_numbers_of_any_country_are_replaced(number):
    out, counts = scrub(f"Call {number} today.", PIIConfig(phone_regions=[]))
    assert out == "Call <PHONE> today."
    assert counts == {"email": 0, "phone": 1, "ip": 0, "key": 0}


@pytest.mark.parametrize("number", NORTH_AMERICAN)
def test_north_american_numbers_are_replaced_by_default(number):
    out, counts = scrub(f"Call {number}.", PIIConfig())
    assert (out, counts["phone"]) == ("Call <PHONE>.", 1)


@pytest.mark.parametrize(("region", "number"), NATIONAL)
def test_national_numbers_need_their_region(region, number):
    text = f"Tel. {number}, ask for Sam."
    assert scrub(text, PHONE_ONLY) == (text, {"email": 0, "phone": 0, "ip": 0, "key": 0})
    out, counts = scrub(text, PIIConfig(kinds=["phone"], phone_regions=["US", region]))
    assert (out, counts["phone"]) == ("Tel. <PHONE>, ask for Sam.", 1)


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_are_not_phone_numbers(text):
    every_region = PIIConfig(kinds=["phone"], phone_regions=["US", "GB", "DE", "FR", "JP", "IN", "BR", "AU"])
    for cfg in (PHONE_ONLY, every_region):
        for doc in (text, f"see {text} here", f"({text})"):
            assert scrub(doc, cfg) == (doc, {"email": 0, "phone": 0, "ip": 0, "key": 0})


def test_all_kinds_together_count_each_once():
    text = (
        "UK +44 7700 900461, Berlin +49 30 25738190, Paris +33 1 42 68 53 00, Tokyo +81 3-1234-5678, "
        "Mumbai +91 98765 43210, Sao Paulo +55 11 91234-5678, Sydney +61 2 9374 4000, SF (415) 555-0100. "
        "Release 3.11.7 of 2024-11-30, see § 12.3.4, costs $1,299.99; host 93.184.216.34, local 10.100.200.30, "
        "mail jane@example.org, at 1732963200."
    )
    out, counts = scrub(text, PIIConfig())
    assert counts == {"email": 1, "phone": 8, "ip": 1, "key": 0}
    assert out == (
        "UK <PHONE>, Berlin <PHONE>, Paris <PHONE>, Tokyo <PHONE>, "
        "Mumbai <PHONE>, Sao Paulo <PHONE>, Sydney <PHONE>, SF <PHONE>. "
        "Release 3.11.7 of 2024-11-30, see § 12.3.4, costs $1,299.99; host <IP_ADDRESS>, local 10.100.200.30, "
        "mail <EMAIL>, at 1732963200."
    )


def test_a_number_running_on_into_other_digits_is_cut_at_a_space():
    assert scrub("+44 20 7946 0958 2024 entries", PHONE_ONLY)[0] == "<PHONE> 2024 entries"
    assert scrub("(415) 555-0100 12 times", PHONE_ONLY)[0] == "<PHONE> 12 times"
    assert scrub("part 415.555.0100.22", PHONE_ONLY)[0] == "part 415.555.0100.22"  # one dotted number
    assert scrub("id 4155550100x", PHONE_ONLY)[0] == "id 4155550100x"


def test_phone_regions_are_checked_when_the_recipe_is_read():
    def recipe(regions):
        source = {"name": "a", "loader": "text", "weight": 1.0, "files": ["docs/*.txt"]}
        return {"name": "t", "sources": [source | {"filters": {"pii": {"phone_regions": regions}}}]}

    with pytest.raises(RecipeError, match=r"pii.phone_regions: 'de' is not a region .* \(did you mean 'DE'\?\)"):
        parse_recipe(recipe(["US", "de"]))
    assert parse_recipe(recipe(["US", "DE"])).sources[0].filters.pii.phone_regions == ["US", "DE"]
    assert parse_recipe(recipe([])).sources[0].filters.pii.phone_regions == []  # + numbers only
    with pytest.raises(ValueError, match="'XX' is not a region"):
        scrub("Call 030 25738190.", PIIConfig(phone_regions=["XX"]))
