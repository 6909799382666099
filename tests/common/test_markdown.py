"""The one markdown table writer (common/markdown.py): layout, alignment, refusals."""

from __future__ import annotations

import pytest

from common.markdown import table, table_lines


def test_a_table_has_a_header_an_alignment_row_and_one_line_per_row() -> None:
    text = table(["model", "size MB", "note"], [["teacher", "42.00", ""], ["student", 8, "int8"]], align="lr")
    assert text == (
        "| model | size MB | note |\n|---|---:|---|\n| teacher | 42.00 |  |\n| student | 8 | int8 |"
    )


def test_centre_alignment_and_a_table_without_rows() -> None:
    assert table_lines(["a", "b"], [], align="c") == ["| a | b |", "|:---:|---|"]


@pytest.mark.parametrize("align", ["lrr", "x"])
def test_an_alignment_that_does_not_fit_the_columns_is_refused(align: str) -> None:
    with pytest.raises(ValueError, match="align"):
        table(["a", "b"], [["1", "2"]], align=align)


def test_a_row_with_another_number_of_cells_is_refused() -> None:
    with pytest.raises(ValueError, match="row 2 has 1 cells, the header 2"):
        table(["a", "b"], [["1", "2"], ["3"]])
