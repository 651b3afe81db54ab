from lmkiln.data.pii import luhn_ok, redact


def test_redacts_each_kind_with_placeholders():
    text = (
        "Mail anna@kiln.org, phone (212) 555-0147 or +44 20 7946 0958, server 192.168.10.4 "
        "and 2001:db8::8a2e:370:7334, card 4111 1111 1111 1111, SSN 123-45-6789."
    )
    out, counts = redact(text)
    assert out == (
        "Mail <EMAIL>, phone <PHONE> or <PHONE>, server <IP_ADDRESS> and <IP_ADDRESS>, "
        "card <CARD_NUMBER>, SSN <US_SSN>."
    )
    assert counts == {"email": 1, "phone": 2, "ip": 2, "card": 1, "ssn": 1}


def test_leaves_non_personal_numbers_alone():
    text = "Order 4111 1111 1111 1112 shipped on 2024-05-17; version 3.11.7; 1,234,567 users; call 999."
    out, counts = redact(text)
    assert out == text and not counts  # the order number fails the Luhn check


def test_luhn_and_kind_selection():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    out, counts = redact("anna@kiln.org 10.0.0.1", kinds={"ip"})
    assert out == "anna@kiln.org <IP_ADDRESS>" and counts == {"ip": 1}


def test_cards_need_a_network_prefix_as_well_as_luhn():
    # 113542617735902 passes the Luhn check, but no card network issues numbers starting with 1
    order = "Cancel order 113542617735902 please."
    assert luhn_ok("113542617735902") and redact(order) == (order, {})
    for card in ("378282246310005", "5555 5555 5555 4444", "6011-1111-1111-1117", "3530111333300000"):
        assert redact(f"card {card} on file")[0] == "card <CARD_NUMBER> on file", card
