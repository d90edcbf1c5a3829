"""trainer.plot: PNG curves from TensorBoard logs; the plotted series are the logged ones."""
from __future__ import annotations

import numpy as np
import pytest

from tests.trainer_util import launch, read_tsv, write_config
from trainer.plot import figure_layout, main, plot_runs, read_scalars, smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("plot")
    cfg = write_config(root / "tiny.json")
    launch("train.py", ["--corpus_path", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer_dir),
                        "--max_seq_length", "64", "--train_batch_size", "4", "--num_steps", "4",
                        "--logging_steps", "1", "--num_workers", "0", "--no_progress",
                        "--output_dir", str(root / "out"), "--model", str(cfg), "--model_name", "real"])
    return root / "out" / "real"


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """An ICT run written directly, with a resume that rewrites steps 3..4 (purge_step)."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path_factory.mktemp("plot") / "synthetic"
    w = SummaryWriter(log_dir=str(run / "tensorboard"))
    for step in range(1, 5):
        w.add_scalar("train/loss", 10.0 - step, step)
        w.add_scalar("train/ict_acc", 0.1 * step, step)
        w.add_scalar("eval/recall_at_5", 0.5, step)
    w.close()
    w = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=3)
    for step in range(3, 7):
        w.add_scalar("train/loss", 100.0 + step, step)
        w.add_scalar("train/ict_acc", 0.1 * step, step)
    w.close()
    return run


def test_plots_overlay_runs_with_logged_data(real_run, synthetic_run, tmp_path):
    plotted = plot_runs([real_run, synthetic_run], tmp_path / "png")
    for fig in ("loss", "mlm", "sop", "ict", "lr", "throughput", "memory", "eval"):
        data = (tmp_path / "png" / f"{fig}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, fig
    assert set(plotted["loss"]["train/loss"]) == {"real", "synthetic"}
    assert plotted["mlm"].keys() == {"train/mlm_loss", "train/mlm_acc"}
    assert set(plotted["ict"]["train/ict_acc"]) == {"synthetic"}
    # flat bookkeeping series of the real run get no panel (test_constant_bookkeeping_series_get_no_panel)
    assert {"train/aux_loss", "train/epoch", "train/loss_scale"} <= plotted.constant.keys()
    assert plotted["loss"].keys() == {"train/loss"} and plotted["lr"].keys() == {"train/lr"}
    # real run: what was plotted is what the trainer logged (loss.tsv, 6 significant digits)
    rows = read_tsv(real_run / "loss.tsv")
    for tag, col in (("train/loss", "loss"), ("train/mlm_acc", "mlm_acc"), ("train/lr", "lr"),
                     ("perf/tokens_per_s", "tokens_per_s")):
        fig = next(f for f, tags in plotted.items() if tag in tags)
        steps, values = plotted[fig][tag]["real"]
        assert steps.tolist() == [int(r["step"]) for r in rows] == [1, 2, 3, 4]
        np.testing.assert_allclose(values, [r[col] for r in rows], rtol=1e-5, atol=1e-12)
    # synthetic run: the resumed values replace the purged ones
    steps, values = plotted["loss"]["train/loss"]["synthetic"]
    assert steps.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(values, [9, 8, 103, 104, 105, 106])


def test_smoothing_is_debiased_ema(synthetic_run, tmp_path):
    raw = read_scalars(synthetic_run)["train/loss"][1]
    plotted = plot_runs([synthetic_run], tmp_path, smoothing=0.5, names=["s"])
    shown = plotted["loss"]["train/loss"]["s"][1]
    assert shown[0] == raw[0]
    np.testing.assert_allclose(shown[1], (0.25 * raw[0] + 0.5 * raw[1]) / 0.75)
    np.testing.assert_allclose(smooth(np.full(5, 3.0), 0.9), 3.0)


def test_layout_groups_objectives():
    layout = figure_layout({"train/loss", "train/aux_loss", "train/sop_acc", "train/sop_loss",
                            "train/lr", "perf/tokens_per_s", "eval/em"})
    assert layout["sop"] == ["train/sop_loss", "train/sop_acc"]
    assert layout["loss"] == ["train/loss", "train/aux_loss"]
    assert layout["eval"] == ["eval/em"] and layout["throughput"] == ["perf/tokens_per_s"]


def test_cli_and_errors(synthetic_run, tmp_path, capsys):
    assert main([str(synthetic_run / "tensorboard"), "--out", str(tmp_path / "o"), "--smooth", "0.2"]) == 0
    assert "ict.png" in capsys.readouterr().out
    assert (tmp_path / "o" / "ict.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(FileNotFoundError, match="missing: no such directory"):
        plot_runs([tmp_path / "missing"], tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        plot_runs([tmp_path / "empty"], tmp_path / "o")
    with pytest.raises(SystemExit):
        main([str(synthetic_run), "--out", str(tmp_path), "--smooth", "1.5"])


def test_the_users_png_files_are_never_replaced(synthetic_run, tmp_path, capsys):
    """--out holding a loss.png of the user's: refused before any file is written (exit 1, nothing
    changed); a rerun into its own earlier plots replaces them; --overwrite replaces the user's."""
    out = tmp_path / "figures"
    out.mkdir()
    mine = PNG_MAGIC + b"a figure for the paper"
    (out / "loss.png").write_bytes(mine)
    with pytest.raises(SystemExit) as exc:
        main([str(synthetic_run), "--out", str(out)])
    assert exc.value.code == 1
    assert ("already holds loss.png, not written by trainer.plot: pick another --out, or pass --overwrite to "
            "replace them") in capsys.readouterr().err
    assert sorted(x.name for x in out.iterdir()) == ["loss.png"] and (out / "loss.png").read_bytes() == mine
    assert main([str(synthetic_run), "--out", str(tmp_path / "o")]) == 0
    first = {x.name: x.stat().st_mtime_ns for x in (tmp_path / "o").iterdir()}
    assert main([str(synthetic_run), "--out", str(tmp_path / "o"), "--smooth", "0.5"]) == 0  # its own: replaced
    assert {x.name for x in (tmp_path / "o").iterdir()} == set(first)  # no temporary files left
    assert main([str(synthetic_run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "loss.png").read_bytes() != mine and (out / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_constant_bookkeeping_series_get_no_panel(real_run, tmp_path, capsys):
    """aux_loss without MoE, loss_scale without fp16, epoch and the optimizer state never change in
    the tiny run: no panel, their values printed; overlaid with a run where aux_loss moves, it is drawn."""
    from torch.utils.tensorboard import SummaryWriter

    from trainer.plot import constant_series

    real = read_scalars(real_run)
    constant = constant_series({"real": real})
    state_mb = real["perf/optimizer_state_mb"][1][0]
    assert constant == {"perf/optimizer_state_max_mb": pytest.approx(state_mb), "perf/optimizer_state_mb": pytest.approx(state_mb),
                        "train/aux_loss": 0.0, "train/epoch": 0.0, "train/loss_scale": 1.0}
    moe = tmp_path / "moe"
    w = SummaryWriter(log_dir=str(moe / "tensorboard"))
    for step in range(1, 4):
        w.add_scalar("train/aux_loss", 0.01 * step, step)
        w.add_scalar("train/loss_scale", 1.0, step)
        w.add_scalar("train/acc", 0.5, step)
    w.close()
    both = constant_series({"real": real, "moe": read_scalars(moe)})
    assert "train/aux_loss" not in both and both["train/loss_scale"] == 1.0
    assert main([str(moe), "--out", str(tmp_path / "png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "constant, not plotted: train/loss_scale = 1"
    assert f"{tmp_path / 'png' / 'train.png'}: train/acc" in printed      # a flat metric is still drawn
    assert not (tmp_path / "png" / "grad.png").exists()


def test_readme_lists_the_logged_tags(real_run):
    """README's TensorBoard table: every tag a real run writes is in it; every row written by
    'every run' is in the run; the other rows say when they are written ('when enabled: ...', 'on a
    GPU only')."""
    import fnmatch
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## TensorBoard\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln.split("|")[1:3] for ln in section.splitlines() if ln.startswith("| `")]
    documented = {tag: when.strip() for tags, when in rows for tag in re.findall(r"`([a-z_]+/[a-z_*@]+)`", tags)}
    logged = set(read_scalars(real_run))
    missing = sorted(t for t in logged if not any(fnmatch.fnmatch(t, d) for d in documented))
    assert not missing, f"README's TensorBoard table lacks {missing}"
    always = {t for t, when in documented.items() if when == "every run"}
    assert always and not always - logged, f"documented as written by every run but not logged: {always - logged}"
    unclear = {t: w for t, w in documented.items() if w != "every run" and not w.startswith(("when enabled:", "on a GPU"))}
    assert not unclear, unclear


def test_resumed_run_wins_whatever_the_file_names(tmp_path):
    """TensorBoard names files ...<pid>.<counter> and sorts them by name (".10" before ".9"): the
    points of a resumed run's file replace the older file's from its first step on, by time."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from trainer.plot import read_scalars

    d = tmp_path / "run" / "tensorboard"
    w = SummaryWriter(log_dir=str(d))
    for step in range(1, 5):
        w.add_scalar("train/loss", 10.0 - step, step)
    w.close()
    older = next(d.iterdir())
    older.rename(d / "events.out.tfevents.1.host.1.9")
    time.sleep(0.05)
    w = SummaryWriter(log_dir=str(d), purge_step=3)
    for step in range(3, 6):
        w.add_scalar("train/loss", 100.0 + step, step)
    w.close()
    newer = next(p for p in d.iterdir() if p.name != "events.out.tfevents.1.host.1.9")
    newer.rename(d / "events.out.tfevents.1.host.1.10")  # sorts first by name
    steps, values = read_scalars(tmp_path / "run")["train/loss"]
    assert steps.tolist() == [1, 2, 3, 4, 5] and values.tolist() == [9, 8, 103, 104, 105]
