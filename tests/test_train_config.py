"""TrainConfig: paper defaults, YAML + key=value overrides, clear errors, round trip."""

from __future__ import annotations

import pytest

from hist_st.errors import InputError
from hist_st.train.config import TrainConfig, config_to_dict, load_config, save_config


def test_paper_defaults():
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.slides_per_step) == (100, 1e-4, 1e-4, 1)
    assert cfg.genes.n_top == 2000 and cfg.genes.ranking == "hvg" and cfg.genes.scope == "dataset"
    a = cfg.augment.resolved()
    assert (a.shear_deg, a.rotate_deg, a.dropout, a.strength_start, a.strength_end) == (15, 30, 0.2, 1.0, 0.2)
    assert cfg.model.levels == "111-21" and cfg.model.dim == 512 and cfg.model.heads == 8
    b = TrainConfig().augment.__class__(variant="authors").resolved()
    assert (b.p_transform, b.dropout, b.shear_deg) == (0.75, 0.75, 30.0)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nmodel:\n  dim: 64\n  heads: 4\naugment:\n  variant: authors\n")
    cfg = load_config(path, ["lr=0.001", "model.levels=11-1", "genes.scope=train-only", "model.tokens=[max,mean]"])
    assert cfg.epochs == 7 and cfg.lr == 1e-3
    assert cfg.model.dim == 64 and cfg.model.levels == "11-1" and cfg.model.tokens == ("max", "mean")
    assert cfg.augment.variant == "authors" and cfg.genes.scope == "train-only"
    out = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(out) == cfg
    assert config_to_dict(cfg)["model"]["dim"] == 64


def test_config_errors(tmp_path):
    with pytest.raises(InputError, match="unknown key.*epoch"):
        load_config(None, ["epoch=3"])
    with pytest.raises(InputError, match="valid keys under model"):
        load_config(None, ["model.width=3"])
    with pytest.raises(InputError, match="expected an integer"):
        load_config(None, ["epochs=many"])
    with pytest.raises(InputError, match="key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="ranking"):
        load_config(None, ["genes.ranking=random"])
    with pytest.raises(InputError, match="divisible"):
        load_config(None, ["model.dim=30", "model.heads=4"])
    with pytest.raises(InputError, match="epochs must be"):
        load_config(None, ["epochs=0"])


@pytest.mark.parametrize(
    ("item", "message"),
    [("epochs", "not of the form key=value"), ("=3", "empty key"), ("model..dim=3", "empty key"),
     (".dim=3", "empty key"), ("epochs=[1", "cannot parse the value")],
)
def test_one_override_parser_rejects_malformed_items(item, message):
    """Every command's key=value items go through `parse_override`: config overrides, --baseline-option and
    bench speed's --model alike refuse a malformed item, naming the option."""
    from hist_st.cli.experiments import parse_baseline_options
    from hist_st.train.config import parse_override, parse_overrides

    with pytest.raises(InputError, match=message) as info:
        parse_override(item)
    assert str(info.value).startswith("config: ")
    with pytest.raises(InputError, match=f"--model: .*{message}"):
        parse_overrides([item], "--model")
    with pytest.raises(InputError, match="--baseline-option: "):
        parse_baseline_options([f"stflow.{item}" if not item.startswith((".", "=")) else item])
    with pytest.raises(InputError, match=message):
        load_config(None, [item])


def test_override_values_are_yaml():
    from hist_st.cli.experiments import parse_baseline_options
    from hist_st.train.config import parse_overrides

    assert parse_overrides(["dim=256", " model.tokens = [max, mean]", "name=", "x=1", "x=2"]) == {
        "dim": 256, "model.tokens": ["max", "mean"], "name": None, "x": 2}
    assert parse_baseline_options(["stflow.epochs=50", "bleep.top_k=5", "stflow.lr=0.001"]) == {
        "stflow": {"epochs": 50, "lr": 1e-3}, "bleep": {"top_k": 5}}
    # YAML 1.1 reads 1e-4 (no dot) as a string; an optimiser then fails far from the command line
    assert parse_baseline_options(["stnet.lr=1e-4", "mlp.lr=-2E+3", "bleep.name=e5"]) == {
        "stnet": {"lr": 1e-4}, "mlp": {"lr": -2e3}, "bleep": {"name": "e5"}}
    with pytest.raises(InputError, match="METHOD.KEY=VALUE"):
        parse_baseline_options(["epochs=50"])


def test_window_half_size_is_named_for_what_it_is(tmp_path):
    """``model.half_window`` is the paper's window half-size w (3: 6 x 6 windows); the old ``model.window``
    override is refused with the new spelling, while configs and checkpoints saved with ``window`` still load."""
    from hist_st.model.config import HiSTConfig

    with pytest.raises(InputError, match=r"model.window: renamed model.half_window.*6 x 6"):
        load_config(None, ["model.window=3"])
    assert load_config(None, ["model.half_window=2"]).model.half_window == 2
    saved = tmp_path / "config.yaml"
    saved.write_text("epochs: 3\nmodel:\n  window: 2\n  dim: 64\n")
    cfg = load_config(saved)
    assert (cfg.model.half_window, cfg.model.dim) == (2, 64)
    old = {k: v for k, v in HiSTConfig(in_dim=8, n_genes=3).to_dict().items() if k != "half_window"}
    assert HiSTConfig.from_dict({**old, "window": 2}).half_window == 2
