"""Reading dvclive's files while the train stage still writes them (what the flow's live table does)."""

from phiops import live


def test_read_merges_curves_by_step_and_leaves_a_half_written_row(tmp_path):
    plots = tmp_path / "plots" / "metrics"
    (plots / "train").mkdir(parents=True)
    (plots / "eval").mkdir()
    (plots / "train" / "loss.tsv").write_text("step\tloss\n5\t2.5\n10\t1.25\n15\t1.")  # row 15 still being written
    (plots / "train" / "learning_rate.tsv").write_text("step\tlearning_rate\n5\t0.001\n10\t0.001\n")
    (plots / "eval" / "loss.tsv").write_text("step\tloss\n10\t1.5\n")
    rows = live.read(tmp_path)
    assert rows == [{"step": 5, "train/loss": 2.5, "train/learning_rate": 1e-3},
                    {"step": 10, "train/loss": 1.25, "train/learning_rate": 1e-3, "eval/loss": 1.5}]
    table = live.markdown(rows).splitlines()
    assert table[2].startswith("| step | loss | lr |") and len(table) == 6
    assert table[-1].startswith("| 10 | 1.2500 | 1.00e-03 |") and table[-1].endswith("| 1.5000 |")


def test_read_before_the_first_logging_step_is_empty(tmp_path):
    assert live.read(tmp_path / "absent") == []
