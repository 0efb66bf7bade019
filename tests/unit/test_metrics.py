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


def test_rouge_l_is_order_aware_f1():
    from phiops.metrics import rouge_l

    assert rouge_l("the printer is broken", "The printer is broken.") == 1.0
    # LCS "printer broken" = 2 of 3 predicted and 2 of 4 reference words: F1 = 4/7.
    assert abs(rouge_l("printer totally broken", "the printer is broken") - 4 / 7) < 1e-12
    assert rouge_l("broken printer", "printer broken") == 0.5  # order matters, unlike bag-of-words
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("a b", "c d") == 0.0
