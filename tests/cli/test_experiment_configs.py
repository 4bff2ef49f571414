"""Every experiment config parses with the real CLI parser and holds the paper's values."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from paths import ROOT

from popcorn.fit import main

EXP = ROOT / "experiments"
PUBLISHED = ("https://github.com/prs-eth/Popcorn/raw/main/model/DDA_model/checkpoints/networks/"
             "fusionda_newAug8_16_checkpoint30_lossweight0.5.pt")
SEASONS = ["spring", "summer", "autumn", "winter"]
# dataset: (config, weight decay, occupancy bias, test reference: "1ha" raster, "units" or None)
PAPER = {
    "che": ("swiss.yaml", 5e-7, 0.2267, "1ha"),
    "rwa": ("rwa.yaml", 1e-5, 0.9407, "1ha"),
    "pricp2": ("pricp2.yaml", 5e-7, 0.4119, "units"),  # census blocks
    "uga": ("uga.yaml", 1e-5, 0.9407, None),
}


def print_config(*args: str) -> dict:
    """Run ``python -m popcorn.fit ... --print_config`` in-process; return the parsed config."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def check_paper_model(cfg: dict, wd: float, bias: float) -> None:
    m = cfg["model"]
    assert m["weight_decay"] == pytest.approx(wd)
    assert m["occupancy_bias_init"] == pytest.approx(bias)
    assert m["builtup_weights"] == PUBLISHED
    assert (m["occupancy_init"], m["modalities"], m["occupancy_split"]) == ("pretrained", "s1s2", True)
    assert (m["lr"], m["lr_step_size"], m["lr_gamma"], m["occupancy_regularisation"]) == (1e-4, 5, 0.75, 0.01)


@pytest.mark.parametrize("name", list(PAPER))
def test_country_configs(name):
    path, wd, bias, fine = PAPER[name]
    cfg = print_config("fit", "--config", str(EXP / path))
    check_paper_model(cfg, wd, bias)
    assert cfg["seed_everything"] == 1600
    t = cfg["trainer"]
    assert t["max_epochs"] == 100 and t["gradient_clip_val"] == 0.01
    d = cfg["data"]
    assert d["class_path"] == "popcorn.datamodules.CensusDataModule"
    a = d["init_args"]
    assert a["seasons"] == SEASONS and a["test_seasons"] == SEASONS and a["batch_size"] == 2
    assert a["imagery_root"] == f"data/{name}/imagery"
    assert a["census_regions"] == f"data/{name}/census/census_regions.gpkg"
    assert (a["fine_truth"] is not None) == (fine == "1ha")
    assert (a["fine_regions"] is not None) == (fine == "units")
    if fine == "units":
        assert a["fine_regions"] == f"data/{name}/blocks/census_regions.gpkg"
        assert a["fine_counts"] == f"data/{name}/blocks/census_counts.csv"
        assert (a["fine_id_column"], a["fine_count_column"]) == ("region_id", "count")


def test_transfer_uganda_to_kigali():
    cfg = print_config("test", "--config", str(EXP / "uga_to_kigali.yaml"),
                       "--ckpt_path", "runs/uga/best.ckpt")
    uga = print_config("fit", "--config", str(EXP / "uga.yaml"))
    assert cfg["model"] == uga["model"]  # the uga checkpoint fits
    a = cfg["data"]["init_args"]
    assert a["imagery_root"] == "data/kigali/imagery" and a["fine_truth"].endswith("population_1ha.tif")
    assert cfg["ckpt_path"] == "runs/uga/best.ckpt"


def test_ablations_and_bag():
    expected = {
        "direct_estimation.yaml": {"occupancy_split": False, "occupancy_init": "pretrained"},
        "scratch_init.yaml": {"occupancy_init": "scratch", "occupancy_split": True},
        "direct_scratch.yaml": {"occupancy_init": "scratch", "occupancy_split": False},
        "s1_only.yaml": {"modalities": "s1"},
        "s2_only.yaml": {"modalities": "s2"},
    }
    assert sorted(p.name for p in (EXP / "ablations").glob("*.yaml")) == sorted(expected)
    for name, values in expected.items():
        cfg = print_config("fit", "--config", str(EXP / "swiss.yaml"), "--config",
                           str(EXP / "ablations" / name))
        for k, v in values.items():
            assert cfg["model"][k] == v, (name, k)
        assert cfg["model"]["weight_decay"] == pytest.approx(5e-7)  # the rest is the country's
    seeds = sorted(p.name for p in (EXP / "bag").glob("*.yaml"))
    assert seeds == [f"seed_{s}.yaml" for s in range(1600, 1605)]
    for s in range(1600, 1605):
        cfg = print_config("fit", "--config", str(EXP / "rwa.yaml"), "--config",
                           str(EXP / "bag" / f"seed_{s}.yaml"))
        assert cfg["seed_everything"] == s and cfg["model"]["weight_decay"] == pytest.approx(1e-5)


def test_country_configs_share_one_base(tmp_path) -> None:
    """The published weights URL and the protocol live once, in experiments/base/country.yaml;
    a country config overrides only its own keys, and a later --config overrides both."""
    from popcorn.errors import PopcornInputError
    from popcorn.fit import expand_config

    fit_configs = [*EXP.glob("*.yaml"), *(EXP / "base").glob("*.yaml"), *(EXP / "ablations").glob("*.yaml")]
    mentions = [p.name for p in fit_configs if PUBLISHED in p.read_text()]
    assert mentions == ["country.yaml"], mentions
    files = expand_config(str(EXP / "rwa.yaml"))
    assert files[0] == str(EXP / "base" / "country.yaml") and "base" not in yaml.safe_load(open(files[1]))
    cfg = print_config("fit", "--config", str(EXP / "rwa.yaml"), "--config", str(EXP / "ablations" / "s1_only.yaml"))
    assert cfg["model"]["modalities"] == "s1" and cfg["model"]["weight_decay"] == pytest.approx(1e-5)
    (tmp_path / "a.yaml").write_text("base: [b.yaml]\nseed_everything: 1\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(PopcornInputError, match="include it again"):
        expand_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: [missing.yaml]\n")
    with pytest.raises(PopcornInputError, match="missing.yaml does not exist"):
        expand_config(str(tmp_path / "c.yaml"))
    # the copy without the base key lives as long as the process that parses it, no longer
    code = f"from popcorn.fit import expand_config; print(expand_config({str(EXP / 'rwa.yaml')!r})[-1])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    copy = Path(done.stdout.strip())
    assert copy.name == "rwa.yaml" and copy.parent.name.startswith("popcorn-config-")
    assert not copy.parent.exists()
