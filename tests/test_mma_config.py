"""How the tensor-core W4A16 kernel's launch configuration is chosen (w4a16_cuda.pick_config),
checked on the CPU: every configuration picked for the engines' shapes must fit the shared
memory one block may use on each device class this runtime serves (a block that asks for more
fails to launch, and with it the engine's warm-up), and on SM 9.0, where the choice was
measured, it must be that measured choice."""

import pytest

from edgellm.engine.kernels import w4a16_cuda

# (device, SMs, shared memory per block with opt-in, bytes): CUDA's limits per compute capability.
DEVICES = [
    ("L40S (SM 8.9)", 142, 99 * 1024),
    ("Jetson AGX Orin (SM 8.7)", 16, 163 * 1024),
    ("Jetson Orin Nano (SM 8.7)", 8, 163 * 1024),
    ("A10 (SM 8.6)", 72, 99 * 1024),
    ("H100 / H200 (SM 9.0)", 132, 227 * 1024),
]
SM90_LIMIT = 227 * 1024

# Linear shapes (N, K) of the published Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B configs:
# q|k|v, o, gate|up, down.
SHAPES = [
    (3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192),
    (5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192),
    (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
]
ROWS = list(range(1, 17))
COMPILED = {w4a16_cuda.entry_name(*entry) for entry in w4a16_cuda.ENTRIES}


@pytest.mark.parametrize("device,sms,limit", DEVICES, ids=[d[0] for d in DEVICES])
@pytest.mark.parametrize("split_group", [False, True], ids=["g128", "g64"])
def test_every_picked_configuration_fits_the_device(device, sms, limit, split_group):
    for n, k in SHAPES:
        for rows in ROWS:
            config = w4a16_cuda.pick_config(n, k, sms, rows, limit, split_group)
            mb = 1 if rows <= 8 else 2
            need = w4a16_cuda.shared_bytes(config, mb, split_group)
            assert need <= limit, f"{device}: {config} for N={n} K={k} rows={rows} needs {need} > {limit} bytes"
            assert config.tiles == 1 or rows <= 8, f"two-tile blocks take up to 8 rows, picked for {rows}"
            entry = w4a16_cuda.entry_name(mb, config.stages, split_group, w4a16_cuda.block_threads(config.warps),
                                          config.tiles)
            assert entry in COMPILED, f"{config} for rows={rows} launches {entry}, which the cubin does not have"


def test_on_sm90_the_pick_is_the_measured_choice():
    """The H100/H200 figures in docs/benchmarks.md were measured with these choices."""
    for n, k in SHAPES:
        for rows in ROWS:
            for split_group in (False, True):
                assert (w4a16_cuda.pick_config(n, k, 132, rows, SM90_LIMIT, split_group)
                        == w4a16_cuda.pick_config(n, k, 132, rows)), (n, k, rows, split_group)


def test_an_l40s_gets_a_shallower_ring_where_the_measured_one_does_not_fit():
    """8B o at one row: 16 warps with a ring of 5 (110 KB) on SM 9.0; the L40S allows 99 KB."""
    preferred = w4a16_cuda.pick_config(4096, 4096, 142, 1)
    assert preferred == w4a16_cuda.MmaConfig(16, 5)
    assert w4a16_cuda.shared_bytes(preferred, 1, False) > 99 * 1024
    assert w4a16_cuda.pick_config(4096, 4096, 142, 1, 99 * 1024) == w4a16_cuda.MmaConfig(16, 4)


def test_a_device_with_too_little_shared_memory_gets_a_clear_error():
    with pytest.raises(RuntimeError, match="no W4A16 kernel configuration fits in 4096 bytes"):
        w4a16_cuda.pick_config(4096, 4096, 132, 1, 4096)


def test_two_tile_blocks_can_be_turned_off(monkeypatch):
    assert w4a16_cuda.pick_config(16384, 2048, 132, 1).tiles == 2  # 1B gate|up
    monkeypatch.setenv("EDGELLM_MMA_TWO_TILES", "0")
    for n, k in SHAPES:
        for rows in ROWS:
            assert w4a16_cuda.pick_config(n, k, 132, rows).tiles == 1


# ---- the bulk-streamed kernel (SM 9.0+: H100, H200; 228 KB of shared memory per SM) ----

SM90_PER_SM = 228 * 1024


@pytest.mark.parametrize("blocks_per_sm", [None, 1, 2, 3])
def test_every_bulk_configuration_fits_its_share_of_the_sm(blocks_per_sm):
    """For every engine shape and 1..8 rows: a K split dividing K's pairs, at least two stages, a
    grid of at most blocks_per_sm blocks per SM, each block's shared memory within its share of the
    SM (so that they are resident together) and within the per-block limit, and every unit of work
    taken by some block (grid x units per block covers them, no block without one)."""
    for n, k in SHAPES:
        for rows in range(1, 9):
            config = w4a16_cuda.pick_bulk_config(n, k, 132, rows, SM90_PER_SM, blocks_per_sm)
            assert config is not None, (n, k, rows)
            assert (k // 128) % config.ks == 0 and config.stages >= 2
            need = w4a16_cuda.bulk_shared_bytes(config, rows)
            per_sm = blocks_per_sm or 3  # the default picks 2 or 3
            assert need <= SM90_PER_SM // per_sm - 1024 or (blocks_per_sm is None and need <= SM90_PER_SM // 2 - 1024)
            assert need <= SM90_LIMIT, (n, k, rows, config, need)
            units = -(-(-(-n // 16)) // (w4a16_cuda.BULK_WARPS // config.ks))
            per_block = -(-units // config.grid)
            assert config.grid <= per_sm * 132 and (config.grid - 1) * per_block < units <= config.grid * per_block


def test_the_bulk_pick_is_the_measured_choice():
    """K split 8 ways (one 8 KB copy per stage); 3 blocks per SM where the units fill them (8B
    gate|up: 1792 tiles, 5 per block, 6 stages), else 2 with more stages (8B down: 256 tiles, 9
    stages). Measured on an H100, docs/benchmarks.md, 2026-12-07."""
    assert w4a16_cuda.pick_bulk_config(28672, 4096, 132, 1, SM90_PER_SM) == w4a16_cuda.BulkConfig(8, 6, 359)
    assert w4a16_cuda.pick_bulk_config(4096, 14336, 132, 1, SM90_PER_SM) == w4a16_cuda.BulkConfig(8, 9, 256)
    # fewer splits where asked (measuring): 8B gate|up at a split of 2, 2 blocks per SM
    assert w4a16_cuda.pick_bulk_config(28672, 4096, 132, 1, SM90_PER_SM, 2, 12, 1) == w4a16_cuda.BulkConfig(2, 10, 224)


def test_only_large_weights_take_the_bulk_kernel_by_default(monkeypatch):
    """Where it was measured faster: the 8B shape's gate|up and down (>= 24 MB of INT4), not its
    q|k|v and o, nor any 1B projection. (Checked without a GPU: the size rule answers before the
    device is asked for its SM.)"""
    monkeypatch.delenv("EDGELLM_W4A16_BULK", raising=False)
    big = [(n, k) for n, k in SHAPES if n * k // 2 >= w4a16_cuda.BULK_MIN_WEIGHT_BYTES]
    assert big == [(16384, 3072), (28672, 4096), (4096, 14336)]  # 3B gate|up too (25 MB; not measured)
    for n, k in SHAPES:
        if (n, k) not in big:
            assert not w4a16_cuda.bulk_supported(None, 1, n, k)
    assert not w4a16_cuda.bulk_supported(None, 9, 28672, 4096)  # more than 8 rows: the ring kernel
    monkeypatch.setenv("EDGELLM_W4A16_BULK", "0")
    assert not w4a16_cuda.bulk_supported(None, 1, 28672, 4096)


def test_a_bulk_configuration_outside_the_kernel_is_refused():
    with pytest.raises(ValueError, match="split is 1, 2, 4 or 8"):
        w4a16_cuda.BulkConfig(3, 4, 10)
    with pytest.raises(ValueError, match="stages 2..16"):
        w4a16_cuda.BulkConfig(2, 17, 10)
