from phiops.memory import measure_peak


def test_peak_is_per_block_not_per_process():
    with measure_peak("cpu") as big:
        blob = bytearray(200 << 20)
        blob[:: 4096] = b"x" * len(blob[:: 4096])  # touch every page so it is resident
    del blob
    with measure_peak("cpu") as small:
        pass
    assert big["peak_cuda_bytes"] is None
    assert big["peak_rss_bytes"] >= 200 << 20
    if small["rss_scope"] == "block":  # Linux: the second block does not inherit the first's peak
        assert small["peak_rss_bytes"] < big["peak_rss_bytes"] - (150 << 20)
