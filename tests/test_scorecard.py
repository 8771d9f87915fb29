"""The scorecard: three yes/no questions per adapter, and the pick the pre-registered rule makes from them."""

from __future__ import annotations

from types import SimpleNamespace

from dpo_align.report import html
from dpo_align.report.scorecard import Card, as_json, cards, from_json, markdown, plot, ranked, recommend


def card(model, verdict="format shift", specific=0.001, accuracy=0.5, stderr=0.017, chosen=-0.01):
    return Card(model, verdict=verdict, specific=specific, accuracy=accuracy, stderr=stderr, chosen_per_token=chosen)


def test_each_question_turns_on_its_own_number():
    assert card("a", verdict="better").q1 and not card("a", verdict="format shift").q1
    # Q2: more than 2 standard errors above 50%, not at it
    assert card("a", accuracy=0.5 + 2 * 0.017 + 1e-4).q2 and not card("a", accuracy=0.5 + 2 * 0.017 - 1e-4).q2
    # Q3: the chosen log-prob holds (0 included) or falls
    assert card("a", chosen=0.0).q3 and not card("a", chosen=-1e-6).q3
    unanswered = Card("a")
    assert (unanswered.q1, unanswered.q2, unanswered.q3, unanswered.yes) == (None, None, None, 0)


def test_the_rule_prefers_a_specific_fall_then_more_yes_then_the_most_negative_specific_change():
    only_preference = card("preference+chosen", accuracy=0.6, chosen=0.01)  # 2 yes, but ce did not fall specifically
    specific = card("specific", verdict="better", specific=-0.002)  # 1 yes, Q1
    pick, why = recommend([only_preference, specific])
    assert pick is specific and "Recommended: specific" in why
    # among Q1 = yes, more yes wins; on equal answers the more negative specific change wins
    stronger = card("stronger", verdict="better", specific=-0.001, accuracy=0.6)
    assert recommend([specific, stronger])[0] is stronger
    deeper = card("deeper", verdict="better", specific=-0.005)
    pick, why = recommend([specific, deeper])
    assert pick is deeper and "tied on answers with specific" in why


def test_without_a_specific_fall_the_tool_says_so_and_falls_back_on_q2_and_q3():
    a = card("a", accuracy=0.6, specific=0.003)
    b = card("b", accuracy=0.6, chosen=0.0, specific=0.004)  # more yes on Q2 + Q3
    pick, why = recommend([a, b])
    assert pick is b and "No adapter's ce falls specifically" in why
    c = card("c", accuracy=0.6, chosen=0.0, specific=-0.001)  # same answers as b, more negative specific change
    assert recommend([a, b, c])[0] is c
    assert recommend([])[0] is None


def test_the_ranking_is_the_rule_applied_again_and_again():
    """What a search confirms: the first cards in the rule's order; the first is recommend's pick, Q1 = yes before any
    number of other answers, then the answers, then the specific change."""
    a = card("a", accuracy=0.6, chosen=0.0, specific=0.004)  # Q2, Q3
    b = card("b", verdict="better", specific=-0.002)  # Q1 only
    c = card("c", accuracy=0.6, specific=-0.009)  # Q2
    d = card("d", accuracy=0.6, chosen=0.0, specific=-0.001)  # Q2, Q3, more negative than a
    e = card("e", verdict="better", specific=-0.001, chosen=0.0)  # Q1, Q3
    order = [x.model for x in ranked([a, b, c, d, e])]
    assert order == ["e", "b", "d", "a", "c"]
    assert recommend([a, b, c, d, e])[0] is e and recommend([a, c, d])[0] is d


def test_cards_read_the_mean_row_and_the_preference_table():
    rows = [SimpleNamespace(dataset="truthfulqa", verdict="better", specific=-0.01, specific_low=-0.02, specific_high=-0.005),
            SimpleNamespace(dataset="mean", verdict="format shift", specific=0.002, specific_low=-0.001, specific_high=0.004)]
    preference = {"tuned": {"reward": {"accuracy": 0.58, "stderr": 0.02}, "displacement": {"chosen_per_token": 0.001}}}
    (got,) = cards({"controls": {"tuned": rows}}, preference, ["tuned"])
    assert (got.verdict, got.specific, got.q1, got.q2, got.q3) == ("format shift", 0.002, False, True, True)
    assert (got.specific_low, got.specific_high) == (-0.001, 0.004)  # the mean row's interval, for the plot
    (bare,) = cards({}, {}, ["tuned"])  # no controls, no preference: every answer n/a
    assert (bare.q1, bare.q2, bare.q3) == (None, None, None)
    damaged = {"tuned": {"reward": {"accuracy": "0.9", "stderr": float("nan")}, "displacement": {"chosen_per_token": True}}}
    (unreadable,) = cards({}, damaged, ["tuned"])  # a damaged preference.json answers nothing, rather than crashing or saying yes
    assert (unreadable.q2, unreadable.q3) == (None, None)


def test_the_report_shows_the_rows_the_markdown_shows_and_a_damaged_file_reads_as_n_a():
    table = [card("a", verdict="better", specific=-0.002, accuracy=0.6, chosen=0.001), card("b")]
    written = as_json(table, baseline_is_reference=True)
    assert [from_json(c) for c in written["cards"]] == table  # the round trip keeps every number
    report_rows = html.scorecard_blocks(written)[1].rows
    markdown_rows = [line for line in markdown(table, baseline="base", baseline_is_reference=True) if line.startswith("| a ")]
    assert markdown_rows == ["| " + " | ".join(report_rows[0]).replace("yes:", "**yes**:") + " |"]
    assert report_rows[0][1:] == ["yes: better (-0.0020)", "yes: 60.0% ± 1.7", "yes: +0.0010", "3"]
    damaged = {**written, "cards": [{**written["cards"][0], "accuracy": "0.6", "specific": None, "verdict": 3}]}
    assert html.scorecard_blocks(damaged)[1].rows[0][1:3] == ["n/a", "n/a"]
    no_number = {**written, "cards": [{**written["cards"][0], "specific": "x"}]}  # the verdict stands, its number is gone
    assert html.scorecard_blocks(no_number)[1].rows[0][1] == "yes: better"


def test_the_plot_draws_every_adapter_and_survives_unanswered_questions():
    answered = card("a", verdict="better", specific=-0.002, accuracy=0.6, chosen=0.001)
    answered = Card(**{**answered.__dict__, "specific_low": -0.004, "specific_high": -0.001})
    one, three = plot([answered]), plot([answered, card("b"), Card("unanswered")])
    assert one[:4] == three[:4] == b"\x89PNG"
    assert int.from_bytes(three[20:24], "big") > int.from_bytes(one[20:24], "big")  # the PNG's height: a row per adapter
