"""Node specs: the seed's examples, precedence, round trips, errors, missing ids, folding."""

import pytest

from gproc.errors import GprocError
from gproc.nodespec import (
    MAX_DEPTH,
    MAX_LENGTH,
    SpecError,
    Term,
    depth,
    fold,
    format_spec,
    missing,
    parse,
    select,
)

ALL = Term(None)
FOUR = range(1, 5)
EIGHTY = range(1, 81)


def r(lo: int, hi: int | None = None, sub: Term | None = None) -> Term:
    """A term for one range, to keep the expected values readable."""
    return Term(((lo, lo if hi is None else hi),), sub)


# spec -> (parsed form, selection among children 1..4, selection among children 1..80)
SEED_EXAMPLES = {
    "1-80": (
        (r(1, 80),),
        {i: () for i in FOUR},
        {i: () for i in EIGHTY},
    ),
    ".": (
        (ALL,),
        {i: () for i in FOUR},
        {i: () for i in EIGHTY},
    ),
    "1/.": (
        (r(1, sub=ALL),),
        {1: (ALL,)},
        {1: (ALL,)},
    ),
    "./.": (
        (Term(None, ALL),),
        {i: (ALL,) for i in FOUR},
        {i: (ALL,) for i in EIGHTY},
    ),
    "1-3/1-3": (
        (r(1, 3, r(1, 3)),),
        {i: (r(1, 3),) for i in (1, 2, 3)},
        {i: (r(1, 3),) for i in (1, 2, 3)},
    ),
    "1-2,3/1-3": (
        (r(1, 2), r(3, sub=r(1, 3))),
        {1: (), 2: (), 3: (r(1, 3),)},
        {1: (), 2: (), 3: (r(1, 3),)},
    ),
    "1/2/.": (
        (r(1, sub=r(2, sub=ALL)),),
        {1: (r(2, sub=ALL),)},
        {1: (r(2, sub=ALL),)},
    ),
}


@pytest.mark.parametrize("text", SEED_EXAMPLES)
def test_seed_examples_parse_and_select(text: str) -> None:
    parsed, among_four, among_eighty = SEED_EXAMPLES[text]
    assert parse(text) == parsed
    assert select(parsed, FOUR) == among_four
    assert select(parsed, EIGHTY) == among_eighty


def test_nested_slashes_select_level_by_level() -> None:
    """1/2/. : node 1 runs, hands 2/. down; its child 2 runs and hands . down."""
    below_one = select(parse("1/2/."), FOUR)[1]
    below_two = select(below_one, FOUR)
    assert below_two == {2: (ALL,)}
    assert select(below_two[2], [7, 9]) == {7: (), 9: ()}


def test_comma_binds_looser_than_slash() -> None:
    assert parse("1/2,3") == (r(1, sub=r(2)), r(3))
    assert select(parse("1/2,3"), FOUR) == {1: (r(2),), 3: ()}


def test_slash_applies_to_the_whole_range() -> None:
    assert parse("1-2/3") == (r(1, 2, r(3)),)
    assert select(parse("1-2/3"), FOUR) == {1: (r(3),), 2: (r(3),)}


def test_child_named_twice_gets_every_sub_once() -> None:
    assert select(parse("1/2,1/3,1,1/2"), FOUR) == {1: (r(2), r(3))}


def test_select_only_live_children() -> None:
    assert select(parse("1-80"), [3, 5, 200]) == {3: (), 5: ()}
    assert select(parse("."), []) == {}
    assert select(parse("7"), FOUR) == {}


@pytest.mark.parametrize(
    "text", [*SEED_EXAMPLES, "1/2,3", "1-2/3", "0", "5,1,3-4", "./1-2/.,4", "12345"]
)
def test_format_round_trips(text: str) -> None:
    assert format_spec(parse(text)) == text
    assert parse(format_spec(parse(text))) == parse(text)


def test_format_empty_and_multi_range_terms() -> None:
    assert format_spec(()) == ""
    several = Term(((1, 2), (5, 5)), Term(((7, 7), (9, 9))))
    text = format_spec((several,))
    assert text == "1-2/7,1-2/9,5/7,5/9"
    assert select(parse(text), range(1, 10)) == {
        i: (Term(((7, 7),)), Term(((9, 9),))) for i in (1, 2, 5)
    }


@pytest.mark.parametrize(
    ("text", "position", "reason"),
    [
        ("", 0, "the spec ends"),
        (",", 0, "found ','"),
        ("5-2", 0, "range 5-2 runs backwards"),
        ("a", 0, "found 'a'"),
        ("1//2", 2, "found '/'"),
        ("1/", 2, "the spec ends"),
        ("/1", 0, "found '/'"),
        (".-3", 0, "'.' cannot start a range"),
        ("1-.", 2, "'.' cannot end a range"),
        ("1-", 2, "the spec ends"),
        ("-1", 0, "found '-'"),
        ("1,,2", 2, "found ','"),
        ("1,", 2, "the spec ends"),
        ("1, 2", 2, "whitespace"),
        (" 1", 0, "whitespace"),
        ("1 ", 1, "whitespace"),
        ("1-2-3", 3, "expected ',' or '/'"),
        ("..", 1, "expected ',' or '/'"),
        ("1/3-1", 2, "range 3-1 runs backwards"),
        ("1x", 1, "found 'x'"),
        ("\u0661", 0, "expected a node number"),
    ],
)
def test_errors_name_spec_and_position(text: str, position: int, reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(text)
    error = caught.value
    assert isinstance(error, GprocError) and isinstance(error, ValueError)
    assert (error.spec, error.position) == (text, position)
    assert str(error).startswith(f"bad node spec {text!r} at position {position}: ")
    assert reason in str(error)


def test_error_message_for_backwards_range() -> None:
    with pytest.raises(SpecError) as caught:
        parse("5-2")
    assert str(caught.value) == (
        "bad node spec '5-2' at position 0: range 5-2 runs backwards (write the low id first)"
    )


def test_missing_reports_named_ids_that_are_not_live() -> None:
    assert missing(parse("1-6,9/."), [1, 2, 4, 6]) == [3, 5, 9]
    assert missing(parse("3,1-4"), [2]) == [1, 3, 4]
    assert missing(parse("1-4"), FOUR) == []


def test_missing_ignores_dot() -> None:
    assert missing(parse("."), []) == []
    assert missing(parse("./3"), [1]) == []


def test_fold() -> None:
    assert fold(["kn1", "kn2", "kn3", "kn5", "master"]) == "kn[1-3,5],master"
    assert fold(["kn7"]) == "kn7"
    assert fold([]) == ""


def test_fold_numeric_order_and_dedupe() -> None:
    assert fold(["kn10", "kn9", "kn2", "kn1", "kn9", "kn11"]) == "kn[1-2,9-11]"


def test_fold_keeps_prefixes_and_padding_apart() -> None:
    names = ["rack2-n3", "rack2-n4", "kn1", "n01", "n02", "n10", "master"]
    assert fold(names) == "kn1,master,n[01-02],n10,rack2-n[3-4]"


def test_huge_ids_are_refused_before_anyone_enumerates_them() -> None:
    with pytest.raises(SpecError) as err:
        parse("1-4000000000")
    assert err.value.position == 2
    assert "larger than" in str(err.value)


@pytest.mark.parametrize("text", ["/".join(["."] * 1200), "1/" * 1200 + ".", "./" * 900 + "."])
def test_a_deep_spec_is_refused_at_the_level_past_the_limit(text: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(text)
    error = caught.value
    at = 2 * MAX_DEPTH - 1  # the "/" that would open level MAX_DEPTH + 1
    assert (error.spec, error.position) == (text, at)
    assert f"deeper than {MAX_DEPTH} levels" in str(error)
    assert f"at position {at}" in str(error) and f"({len(text)} characters)" in str(error)
    assert len(str(error)) < 300  # quotes the spec around the fault, not all of it


def test_a_spec_as_deep_as_the_limit_works_everywhere() -> None:
    text = "/".join(["1-3"] * MAX_DEPTH)
    spec = parse(text)
    assert depth(spec) == MAX_DEPTH
    assert format_spec(spec) == text
    for level in range(MAX_DEPTH - 1):
        chosen = select(spec, [2, 7])
        assert list(chosen) == [2]
        spec = chosen[2]
        assert missing(spec, [2]) == [1, 3]
        assert depth(spec) == MAX_DEPTH - 1 - level
    assert select(spec, [1, 2]) == {1: (), 2: ()}
    with pytest.raises(SpecError, match=f"deeper than {MAX_DEPTH}"):
        parse(text + "/1")


def test_a_long_spec_is_refused_with_its_length() -> None:
    longest = ",".join(["1"] * (MAX_LENGTH // 2 - 1) + ["12"])
    assert len(longest) == MAX_LENGTH and len(parse(longest)) == MAX_LENGTH // 2
    with pytest.raises(SpecError) as caught:
        parse(longest + ",3")
    assert caught.value.position == MAX_LENGTH
    assert f"{MAX_LENGTH + 2} characters long, more than {MAX_LENGTH}" in str(caught.value)


def test_a_run_of_digits_is_one_id_or_a_clear_error() -> None:
    assert parse("0" * 4000 + "7") == (r(7),)
    with pytest.raises(SpecError) as caught:
        parse("9" * 4096)  # more digits than int() converts by default
    assert caught.value.position == 0
    assert "node id 999999999999... is larger than 99999" in str(caught.value)


def test_many_overlapping_ranges_name_each_missing_id_once() -> None:
    spec = parse(",".join(["1-99999", "5-7/.", "3"] * 250))
    assert missing(spec, range(2, 99999)) == [1, 99999]
    assert select(spec, [1, 6]) == {1: (), 6: (ALL,)}
