from quantrt.tables import format_table


def test_columns_are_padded_to_their_widest_cell():
    table = format_table(["scheme", "ms"], [["int8wo", 1.5], ["fp6_e3m2", None]])
    assert table.splitlines() == [
        "| scheme   | ms   |",
        "|----------|------|",
        "| int8wo   | 1.5  |",
        "| fp6_e3m2 | None |",
    ]


def test_a_table_without_rows_is_its_header():
    assert format_table(["a", "bb"], []).splitlines() == ["| a | bb |", "|---|----|"]
