import unittest

import pytest
from baseline_helpers import run_on_rank, sharded_modules_match_unsharded
from torchrec.distributed.test_utils.multi_process import MultiProcessTestBase


@pytest.mark.distributed
class ShardedBaselinesTest(MultiProcessTestBase):
    def test_row_wise_and_table_wise_sharded_baselines_pool_like_unsharded(self) -> None:
        self._run_multi_process_test(callable=run_on_rank, check=sharded_modules_match_unsharded, world_size=2)


if __name__ == "__main__":
    unittest.main()
