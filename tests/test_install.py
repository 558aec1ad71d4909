from lhf_torchrec.install_check import check_fbgemm_tbe


def test_fbgemm_table_batched_lookup_runs_on_this_host():
    # Fails with ImportError naming the FBGEMM build when fbgemm_gpu cannot load (e.g. the CUDA
    # build on a machine without a driver), and on a wrong lookup result.
    assert check_fbgemm_tbe() < 1e-5
