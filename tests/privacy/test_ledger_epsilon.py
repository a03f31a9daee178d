"""The ledger answers epsilon once per step composed, and the answer is the accountant's own."""

from __future__ import annotations

import pytest

from tensafe.config import build_config
from tensafe.engine.ledger import build_ledger
from tensafe.testing import fresh_plugin_manager


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_after_admission_and_charge_is_the_accountants_exact_value(accountant: str) -> None:
    config = build_config(
        {
            "dp": {"accountant": accountant, "noise_multiplier": 1.1, "target_epsilon": 50.0},
            "training": {"batch_size": 8},
        },
        environ={},
    )
    registry = fresh_plugin_manager(autoload=True).registry
    ledger = build_ledger(config, registry, 1000)
    assert ledger is not None
    for step in range(1, 6):
        ledger.check_budget(step - 1)  # computes the epsilon the step would reach
        ledger.charge()
        fresh = registry.accountant(accountant)
        fresh.load_state(ledger.accountant.state())
        assert ledger.epsilon() == fresh.get_epsilon(ledger.delta)
        assert ledger.epsilon() == ledger.accountant.get_epsilon(ledger.delta)
    saved = ledger.to_state()
    ledger.charge()
    moved = ledger.epsilon()
    ledger.restore(saved)
    assert ledger.epsilon() < moved and ledger.epsilon() == ledger.accountant.get_epsilon(ledger.delta)
