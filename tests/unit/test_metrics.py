from phiops.metrics import exact_match, json_fields, json_validity

REF = '{"category": "billing", "priority": "high", "product": "Nimbus"}'


def test_json_fields_partial_credit():
    assert json_fields(REF, REF) == 1.0
    assert json_fields('{"category": "billing", "priority": "low", "product": "Nimbus"}', REF) == 2 / 3
    assert json_fields("not json", REF) == 0.0


def test_json_fields_ignores_trailing_prose():
    assert json_fields(REF + " Hope this helps!", REF) == 1.0


def test_validity_and_exact():
    assert json_validity("[1, 2]", REF) == 0.0
    assert json_validity(REF, REF) == 1.0
    assert exact_match(" x ", "x") == 1.0 and exact_match("x", "y") == 0.0
