import pytest
import torch

from centerpoint import devices
from centerpoint.errors import CenterpointError


def test_auto_prefers_cuda_then_sdaa_then_cpu():
    assert devices.resolve_name("auto", lambda n: n in ("cuda", "sdaa")) == "cuda"
    assert devices.resolve_name("auto", lambda n: n == "sdaa") == "sdaa"
    assert devices.resolve_name("auto", lambda n: False) == "cpu"
    assert devices.resolve_name("cpu", lambda n: n == "cpu") == "cpu"


def test_explicit_device_must_exist():
    with pytest.raises(CenterpointError, match="torch_sdaa is not installed"):
        devices.resolve_name("sdaa", lambda n: n == "cpu")
    with pytest.raises(CenterpointError, match="no CUDA GPU"):
        devices.resolve_name("cuda", lambda n: n == "cpu")
    with pytest.raises(CenterpointError, match="expected auto"):
        devices.resolve_name("tpu")


def test_backends_strings_and_policies():
    sdaa = devices.make_backend("sdaa", 2)
    assert sdaa.device_string == "sdaa:2" and sdaa.dist_backend == "tccl" and not sdaa.compile_by_default
    cuda = devices.make_backend("cuda", 1)
    assert cuda.device_string == "cuda:1" and cuda.dist_backend == "nccl" and cuda.compile_by_default
    cpu = devices.make_backend("cpu")
    assert cpu.dist_backend == "gloo" and cpu.free_sync and not cpu.compile_by_default
    assert devices.should_compile(cuda, "auto") and not devices.should_compile(cpu, "auto")
    assert devices.should_compile(cpu, "on") and not devices.should_compile(cuda, "off")
    with pytest.raises(CenterpointError, match="not supported on sdaa"):
        devices.should_compile(sdaa, "on")


def test_precision_resolution():
    cpu, cuda, sdaa = devices.make_backend("cpu"), devices.make_backend("cuda"), devices.make_backend("sdaa")
    yes, no = (lambda n: True), (lambda n: False)
    assert devices.resolve_precision(cpu, "auto", yes) == "bf16"
    assert devices.resolve_precision(cpu, "auto", no) == "fp32"
    assert devices.resolve_precision(cuda, "auto", yes) == "bf16"
    assert devices.resolve_precision(sdaa, "auto", yes) == "fp32"
    assert devices.resolve_precision(sdaa, "fp16", no) == "fp16"
    with pytest.raises(CenterpointError, match="fp16 needs cuda or sdaa"):
        devices.resolve_precision(cpu, "fp16", yes)
    with pytest.raises(CenterpointError, match="no native bf16"):
        devices.resolve_precision(cpu, "bf16", no)


def test_autocast_context_on_cpu():
    cpu = devices.make_backend("cpu")
    with cpu.autocast("bf16"):
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16
    with cpu.autocast("fp32"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


def test_sdaa_probe_without_torch_sdaa_is_false():
    assert devices.available("sdaa") is False


def test_local_rank_beyond_the_visible_devices_is_a_clear_error():
    devices.check_local_rank("cuda", 1, 2)
    devices.check_local_rank("cpu", 7, 1)  # cpu processes share the one device
    with pytest.raises(CenterpointError, match=r"local rank 3 needs sdaa:3, but this machine shows 3 sdaa"):
        devices.check_local_rank("sdaa", 3, 3)
    with pytest.raises(CenterpointError, match="cuda:0.*0 cuda device"):
        devices.check_local_rank("cuda", 0, 0)
    assert devices.device_count("cpu") == 1
