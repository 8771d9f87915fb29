"""A recipe trained with several seeds: answers over every seed, and a lead read against the noise between seeds."""

from __future__ import annotations

from dpo_align.report import seeds
from dpo_align.report.scorecard import Card, as_json, markdown


def card(model, specific, accuracy=0.6, chosen=0.1, verdict="format shift"):
    return Card(model, verdict=verdict, specific=specific, accuracy=accuracy, stderr=0.017, chosen_per_token=chosen)


def confirmation(one=(-0.010, -0.006), two=(-0.004, -0.002), two_q2=(0.6, 0.6)):
    """Two sweeps of seed=42,7 read by compare (labels with their folder's name), and a run without a seed."""
    return [card("SFT → DPO seed 42 (confirm-1)", one[0]), card("SFT → DPO seed 7 (confirm-1)", one[1]),
            card("SFT → DPO seed 42 (confirm-2)", two[0], accuracy=two_q2[0]), card("SFT → DPO seed 7 (confirm-2)", two[1], accuracy=two_q2[1]),
            card("SFT", -0.5)]


def test_runs_that_differ_only_in_their_seed_are_one_recipe():
    found = seeds.recipes(confirmation() + [card("DPO seed-42", 0.0), card("DPO seed-7", 0.0)])
    assert [(r.name, len(r.seeds)) for r in found] == [("SFT → DPO (confirm-1)", 2), ("SFT → DPO (confirm-2)", 2), ("DPO", 2)]
    assert seeds.recipes([card("SFT", 0.0), card("DPO seed 42", 0.0)]) == []  # a seed alone says nothing about noise
    one = seeds.recipes(confirmation())[0]
    assert abs(one.specific - -0.008) < 1e-12 and abs(one.spread - 0.004) < 1e-12


def test_a_recipe_answers_yes_only_where_every_seed_does():
    split = seeds.recipes(confirmation(two_q2=(0.6, 0.5)))[1]
    assert split.seeds[0].q2 and not split.seeds[1].q2 and split.q2 is False and split.yes == 1  # Q3 yes on both
    missing = seeds.Recipe("x", (card("x seed 1", 0.0), Card("x seed 2", specific=0.0)))
    assert missing.q2 is None and missing.yes == 0


def test_a_lead_counts_only_beyond_the_larger_between_seed_difference():
    # confirm-1's mean -0.008 against confirm-2's -0.003: a lead of 0.005 over a spread of 0.004 (confirm-1's)
    pick, holds, why = seeds.verdict(seeds.recipes(confirmation()))
    assert pick.name == "SFT → DPO (confirm-1)" and holds is True and "the lead holds over 2 seeds" in why
    # the same means, but confirm-1's seeds 0.012 apart: the lead is within the noise of one recipe
    pick, holds, why = seeds.verdict(seeds.recipes(confirmation(one=(-0.014, -0.002))))
    assert pick.name == "SFT → DPO (confirm-1)" and holds is False and "not told apart by 2 seeds" in why


def test_answers_decide_before_the_specific_change():
    # confirm-2 loses Q2 on one seed: confirm-1 leads on its answers, however close the specific changes
    pick, holds, why = seeds.verdict(seeds.recipes(confirmation(one=(-0.001, -0.001), two=(-0.009, -0.009), two_q2=(0.6, 0.5))))
    assert pick.name == "SFT → DPO (confirm-1)" and holds is None and "on its answers (2 yes against 1)" in why
    assert "no Q1" in why  # no recipe's ce falls specifically on every seed: the fallback pick, said so
    better = [card("A seed 1", -0.02, verdict="better"), card("A seed 2", -0.02, verdict="format shift"),
              card("B seed 1", -0.01, verdict="better"), card("B seed 2", -0.01, verdict="better")]
    assert seeds.verdict(seeds.recipes(better))[0].name == "B"  # Q1 on every seed beats a lower mean with one seed's Q1


def test_the_scorecard_reads_recipes_over_seeds_against_the_base_model_only():
    table = confirmation()
    text = "\n".join(markdown(table, baseline="baseline", baseline_is_reference=True))
    assert "## Over seeds" in text and "| SFT → DPO (confirm-1) | 2 | no | **yes** | **yes** | 2 | -0.0080 | 0.0040 |" in text
    data = as_json(table, baseline_is_reference=True)["over_seeds"]
    assert data["pick"] == "SFT → DPO (confirm-1)" and data["lead_holds"] is True
    assert [r["recipe"] for r in data["recipes"]] == ["SFT → DPO (confirm-1)", "SFT → DPO (confirm-2)"]
    # against another adapter the rule does not pick, over seeds neither; a table without seeds has no section
    assert "Over seeds" not in "\n".join(markdown(table, baseline="DPO", baseline_is_reference=False))
    assert as_json(table, baseline_is_reference=False)["over_seeds"] is None
    plain = [card("SFT", -0.5), card("DPO", 0.0)]
    assert "Over seeds" not in "\n".join(markdown(plain, baseline="baseline", baseline_is_reference=True))


def test_the_html_report_shows_the_recipes_over_seeds_from_the_scorecard_json():
    from dpo_align.report import html

    table = confirmation()
    blocks = html.scorecard_blocks(as_json(table, baseline_is_reference=True))
    (section,) = [b for b in blocks if isinstance(b, html.Heading) and b.text == seeds.TITLE]
    rows = blocks[blocks.index(section) + 1].rows
    assert [r[0] for r in rows] == ["SFT → DPO (confirm-1)", "SFT → DPO (confirm-2)"] and rows[0][6] == "-0.0080"
    assert "the lead holds over 2 seeds" in blocks[blocks.index(section) + 2].text
    against_another = html.scorecard_blocks(as_json(table, baseline_is_reference=False))
    assert not any(isinstance(b, html.Heading) and b.text == seeds.TITLE for b in against_another)
