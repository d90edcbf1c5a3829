"""The README documents every flag of the shared parser (its table is `python -m trainer.args`)."""
from pathlib import Path

from trainer.args import get_parse_args, markdown_table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_flag_is_in_the_readme():
    flags = [a.option_strings[0] for a in get_parse_args()._actions if a.option_strings and a.dest != "help"]
    missing = [f for f in flags if f"`{f}`" not in README]
    assert not missing, f"README lacks {missing}: paste `python -m trainer.args` into its Flags section"


def test_flags_table_is_current():
    assert markdown_table() in README, "README's flags table is stale: paste `python -m trainer.args` into it"


def test_export_precision_is_the_tested_one():
    """README states the tolerance tests/test_export.py holds every export to, not a figure of one run."""
    import re

    tested = re.search(r"^TOL = (\S+)$", (Path(__file__).parent / "test_export.py").read_text(), re.M).group(1)
    stated = re.search(r"hidden states and logits match ours to\s+(\S+)", README)
    assert stated and stated.group(1) == tested, f"README: 'match ours to {stated and stated.group(1)}', test: {tested}"
