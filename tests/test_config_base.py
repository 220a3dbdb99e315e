"""pqcad_export.config_base on CalibConfig: presets, overrides, validation, fingerprints, typed choices."""

import pytest

from calibration import CalibConfig, StrategyName, strategy_choices
from pqcad_export.bits import BitSpec
from pqcad_export.config_base import Preset, choices, parse_choice
from pqcad_export.errors import UsageError


def test_preset_and_overrides():
    q = CalibConfig.preset("quick", seed=None, n_per_step=8)
    assert q.n_per_step == 8 and q.batch_size == 16 and q.seed == 0  # None keeps the preset's value
    assert CalibConfig.preset("paper") == CalibConfig()
    with pytest.raises(UsageError, match="unknown preset 'fast': expected quick or paper"):
        CalibConfig.preset("fast")
    with pytest.raises(UsageError, match="unknown calibration option"):
        CalibConfig.preset("quick", n_per_stp=8)
    with pytest.raises(UsageError, match="--every-k must be >= 1"):
        CalibConfig.preset("quick", every_k=0)


def test_fingerprint_follows_the_recorded_fields():
    a, b = CalibConfig.preset("quick"), CalibConfig.preset("quick")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    assert a.with_overrides(seed=1).fingerprint() != a.fingerprint()
    # pcr_* fields are not recorded (nor fingerprinted) for other strategies: resume keys stay as they were
    assert a.with_overrides(pcr_stages=3).fingerprint() == a.fingerprint()
    assert "pcr_stages" not in a.to_dict() and "pcr_stages" not in a.cqc_dict()


def test_typed_choices():
    assert choices(Preset) == ["quick", "paper"]
    assert choices(StrategyName) == ["uniform", "ndtc", "tdac", "pcr"] == strategy_choices()
    with pytest.raises(UsageError, match="unknown --x 'big': expected one of quick, paper"):
        parse_choice(Preset, "big", "--x")
    pcr = CalibConfig.preset("quick", strategy="pcr", pcr_bits="w4a8", pcr_preset="paper").pcr()
    assert pcr.bits == BitSpec(4, 8) and pcr.preset is Preset.PAPER and pcr.stages == 2
    with pytest.raises(UsageError, match="give --bits"):
        CalibConfig.preset("quick", strategy="pcr").pcr()
