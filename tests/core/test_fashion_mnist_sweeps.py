"""The Fashion-MNIST sweep files stay the synthetic ones with only the data-related keys changed
(issue 19 §3-4): a grid change in sweeps/quickstart.yaml or science_check.yaml must be copied."""
from pathlib import Path

import pytest
import yaml

from core.config import load_config

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"


def _load(name: str) -> dict:
    return yaml.safe_load((SWEEPS / name).read_text())


def _zip_runs(spec: dict) -> set:
    """The (key, value) tuples of every zipped configuration, order-free."""
    out = set()
    for group in spec.get("zip", []):
        keys = sorted(group)
        out |= {tuple((k, group[k][i]) for k in keys) for i in range(len(group[keys[0]]))}
    return out


@pytest.mark.parametrize("synthetic, fmnist, eval_changes", [
    ("quickstart.yaml", "quickstart_fmnist.yaml", {"fid_backbone"}),
    ("science_check.yaml", "science_check_fmnist.yaml", {"fid_backbone", "probe_train", "probe_val"}),
])
def test_fmnist_sweep_is_the_synthetic_one_on_other_data(synthetic, fmnist, eval_changes):
    a, b = _load(synthetic), _load(fmnist)
    assert b["name"] == a["name"] + "_fmnist"
    assert b["base"]["data"]["name"] == "fashion_mnist" and b["base"]["eval"]["fid_backbone"] == "embedded-fmnist"
    for section in set(a["base"]) | set(b["base"]):
        if section in ("data", "eval"):
            continue
        assert a["base"].get(section) == b["base"].get(section), section
    changed = {k for k in set(a["base"]["eval"]) | set(b["base"]["eval"])
               if a["base"]["eval"].get(k) != b["base"]["eval"].get(k)}
    assert changed == eval_changes
    for key in ("axes", "seeds", "stages", "executor", "max_parallel", "runs_dir"):
        assert a.get(key) == b.get(key), key
    assert _zip_runs(a) == _zip_runs(b)  # same configurations (the order may differ)
    cfg = load_config(None, {f"data.{k}": v for k, v in b["base"]["data"].items()})
    assert cfg.data.name == "fashion_mnist" and cfg.data.root is None
