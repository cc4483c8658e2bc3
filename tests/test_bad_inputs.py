"""Every row of the bad-input table (tests/bad_input_cases.py) gets its expected verdict.

Error rows must raise the expected type naming the argument and the fix ("clear error"); the other
rows must run and match their float64 / nn.Linear / documented reference ("correct"). Nothing may be
"silent-wrong", a "crash" or "vague". ``python tests/bad_inputs_report.py`` prints the counts.
"""

import pytest

from bad_input_cases import CASES, VERDICTS, verdict


def test_the_table_is_big_enough_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 100
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case):
    got, detail = verdict(case)
    assert got in VERDICTS
    assert got == case.expected, f"{case.id}: expected {case.expected}, got {got}: {detail}"


def test_the_verdicts_themselves():
    """The classifier sorts each kind of outcome into its verdict (so the table can fail)."""
    import warnings

    from bad_input_cases import Case

    def raise_(e):
        def f():
            raise e
        return f

    def fail():
        assert False, "wrong"

    def warn():
        warnings.warn("something about fc1")

    assert verdict(Case("a", lambda: None))[0] == "correct"
    assert verdict(Case("b", fail))[0] == "silent-wrong"
    assert verdict(Case("c", raise_(KeyError("x"))))[0] == "crash"
    assert verdict(Case("d", lambda: None, ValueError, ("rank",)))[0] == "silent-wrong"
    assert verdict(Case("e", raise_(ValueError("rank must be >= 1")), ValueError, ("rank",), (">= 1",)))[0] == "clear error"
    assert verdict(Case("f", raise_(ValueError("bad value")), ValueError, ("rank",), (">= 1",)))[0] == "vague"
    assert verdict(Case("g", raise_(RuntimeError("INTERNAL ASSERT")), ValueError, ("rank",)))[0] == "crash"
    assert verdict(Case("h", lambda: None, warns=("fc1",)))[0] == "silent-wrong"
    assert verdict(Case("i", warn, warns=("fc1",)))[0] == "correct"
