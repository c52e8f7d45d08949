"""Output defaults that depend on the method: a coupled run writes the smaller (materialized) model unless told
not to; other structures keep only the zeroed folder unless asked."""

import pytest

from surgeon.config import PruneConfig, build_config, load_yaml

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("structure, expected", [("coupled", True), ("structured", False), ("unstructured", False),
                                                 ("2:4", False)])
def test_materialize_defaults_to_on_for_coupled_only(structure, expected):
    cfg = build_config({"model": "m", "method": {"structure": structure}})
    assert cfg.output.materialize is expected


@pytest.mark.parametrize("given", [True, False])
def test_an_explicit_materialize_wins(given):
    cfg = build_config({"model": "m", "method": {"structure": "coupled"}, "output": {"materialize": given}})
    assert cfg.output.materialize is given
    again = PruneConfig(**load_yaml(cfg.to_yaml()))  # the resolved value survives the recipe round trip
    assert again.output.materialize is given
