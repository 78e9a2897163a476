"""A GPU fleet's concerns on CPU: token budgets per device type (pure function of name and memory, config checks),
provenance and cost in the ledger, and the resubmitting job wrapper."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdscale.config import ConfigError, load_config
from rdscale.model.fast_esm import GIB, device_budget

H100 = ("NVIDIA H100 80GB HBM3", 85_029_158_912)
A10G = ("NVIDIA A10G", 23_609_475_072)
TABLE = {"H100": 32768, "A10G": 8192, "A100": 16384, "A100 80GB": 24576, "cpu": 2048}


def test_one_table_serves_h100_and_a10g_nodes():
    assert device_budget(*H100, 4096, TABLE) == 32768
    assert device_budget(*A10G, 4096, TABLE) == 8192
    assert device_budget("NVIDIA A100-SXM4-40GB", 42_000_000_000, 4096, TABLE) == 16384
    assert device_budget("NVIDIA A100 80GB PCIe", 85_000_000_000, 4096, TABLE) == 24576  # longest key wins
    assert device_budget("cpu", None, 4096, TABLE) == 2048
    assert device_budget("Tesla T4", 16 * GIB, 4096, TABLE) == 4096  # no key: toks_per_batch
    # No key, derived from memory: tokens per GiB left after the chain's weights.
    assert device_budget("Tesla T4", 16 * GIB, 4096, TABLE, toks_per_gib=1000, weight_bytes=6 * GIB) == 10_000
    assert device_budget("cpu", None, 4096, {}, toks_per_gib=1000) == 4096  # memory unknown


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=30), memory=st.one_of(st.none(), st.integers(0, 200 * GIB)),
       base=st.integers(8, 1 << 20), table=st.dictionaries(st.text(min_size=1, max_size=8), st.integers(8, 1 << 20),
                                                           max_size=4),
       per_gib=st.one_of(st.none(), st.integers(1, 1 << 16)), weights=st.integers(0, 100 * GIB))
def test_device_budget_is_a_table_entry_a_memory_share_or_the_default(name, memory, base, table, per_gib, weights):
    got = device_budget(name, memory, base, table, per_gib, weights)
    keys = [k for k in table if k.lower() in name.lower()]
    if keys:
        assert got == table[max(keys, key=len)]
    elif per_gib and memory:
        assert got >= 8 and got == max(8, int(per_gib * max(0.0, (memory - weights) / GIB)))
        # More memory never lowers the budget.
        assert device_budget(name, memory + GIB, base, table, per_gib, weights) >= got
    else:
        assert got == base


def test_config_validates_the_device_table():
    cfg = load_config(None, ["embedding.toks_per_batch_by_device={H100: 32768, A10G: 8192}",
                             "embedding.toks_per_gib=400"])
    assert cfg.embedding.toks_per_batch_by_device == {"H100": 32768, "A10G": 8192}
    for bad, words in (("{H100: 4}", r"token budget in \[8"), ("{H100: big}", "H100"), ("[32768]", "mapping"),
                       ("{H100: true}", "H100")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, [f"embedding.toks_per_batch_by_device={bad}"])
    with pytest.raises(ConfigError, match="toks_per_gib"):
        load_config(None, ["embedding.toks_per_gib=0"])
    # The packaged cluster config carries a table for its node types.
    table = load_config("uniref50_cluster").embedding.toks_per_batch_by_device
    assert {"H100", "A10G"} <= set(table)


def test_chain_encoder_takes_its_devices_budget(tiny_family):
    from rdscale.run.stages import ChainEncoder

    cfg = load_config(None, [f"models={[str(m) for m in tiny_family]}", "embedding.toks_per_batch=4096",
                             "embedding.toks_per_batch_by_device={cpu: 512, H100: 65536}"])
    encoder = ChainEncoder([str(m) for m in tiny_family], cfg)
    assert encoder.device_name == "cpu" and encoder.toks_per_batch == 512
    assert encoder.budgets[-1] == 512 and [e.toks_per_batch for e in encoder.embedders] == encoder.budgets
