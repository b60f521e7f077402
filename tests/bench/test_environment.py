"""aro.bench.environment: every result records whether bfloat16 products are native here."""

from unittest import mock

from aro import tuning
from aro.bench.environment import environment_info


def test_environment_records_native_bf16_from_the_cpu_flags():
    with mock.patch.object(tuning, "_cpu_flags", return_value=frozenset({"avx2", "avx512_bf16"})):
        assert environment_info()["bf16_native"] is True
    with mock.patch.object(tuning, "_cpu_flags", return_value=frozenset({"avx2"})):
        info = environment_info()
    assert info["bf16_native"] is False and info["threads"] >= 1 and info["torch"]
